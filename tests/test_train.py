"""The trainer end to end on real synthetic data: learning, checkpoints, exact resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose, tiny_overrides
from feedsr.data.reader import split_files
from feedsr.eval.scoring import evaluate_checkpoint
from feedsr.eval.trained import load_trained
from feedsr.runtime.checkpoint import is_complete, latest_checkpoint
from feedsr.runtime.config import ConfigError, to_config
from feedsr.runtime.distributed import distributed
from feedsr.train.trainer import NonFiniteLossError, Trainer, run


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_smoke_train_evaluate_and_resume(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "smoke") + [
        "trainer.max_steps=150", "trainer.checkpoint_every=50", "optimizer.lr=0.005",
    ]
    result = run(compose(overrides))
    assert result.step == 150 and len(result.losses) == 150
    assert sum(result.losses[-20:]) / 20 < sum(result.losses[:20]) / 20
    ckpt = latest_checkpoint(result.run_dir)
    assert ckpt.name == "step-150"
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert kept == ["step-100", "step-150"]  # keep_checkpoints=2
    config = to_config(compose(overrides))
    metrics = evaluate_checkpoint(config, ckpt, "test")
    for task in ("click", "long_view"):
        assert metrics[task].auc > 0.6, metrics[task]
        assert metrics[task].oracle_auc > metrics[task].auc
    assert result.valid["click"].auc > 0.6  # the trainer's own validation, on the valid split
    # a second run() of the same run id finds the complete checkpoint and continues from it
    more = run(compose(overrides[:-3] + ["trainer.max_steps=160", "trainer.checkpoint_every=50",
                                         "optimizer.lr=0.005", "trainer.allow_config_change=true"]))
    assert more.step == 160 and len(more.losses) == 10


def test_best_checkpoint_by_validation_is_kept_and_used_for_the_test(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "best") + [
        "trainer.max_steps=80", "trainer.val_every=10", "trainer.checkpoint_every=0",
        "trainer.select_tasks=[click,like]", "trainer.evaluate_test=true", "optimizer.lr=0.02",
    ]
    result = run(compose(overrides))
    lines = [json.loads(x) for x in (result.run_dir / "valid_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(10, 81, 10))
    scores = [(x["metrics"]["click"]["auc"] + x["metrics"]["like"]["auc"]) / 2 for x in lines]
    best_step = lines[scores.index(max(scores))]["step"]  # the first step reaching the maximum
    best = json.loads((result.run_dir / "best.json").read_text())
    assert best["step"] == result.best["step"] == best_step
    assert best["score"] == pytest.approx(max(scores), abs=1e-12)
    assert best["tasks"] == ["click", "like"]
    # its checkpoint survived the pruning (keep_checkpoints=2), next to the newest ones
    ckpt = result.run_dir / "checkpoints" / f"step-{best_step}"
    assert is_complete(ckpt) and is_complete(result.run_dir / "checkpoints" / "step-80")
    assert len(list((result.run_dir / "checkpoints").iterdir())) <= 3
    # the checkpoint holds the weights that were validated, and the test used them
    config = to_config(compose(overrides))
    again = evaluate_checkpoint(config, ckpt, "valid")
    assert again["click"].auc == pytest.approx(best["metrics"]["click"]["auc"], abs=1e-6)
    test = evaluate_checkpoint(config, ckpt, "test")
    for task in ("click", "long_view", "like"):
        assert result.test[task].auc == pytest.approx(test[task].auc, abs=1e-6)


def test_selection_tasks_must_exist(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "bad") + ["trainer.select_tasks=[clik]"]
    with pytest.raises(ConfigError, match=r"trainer.select_tasks must be names of tasks .*unknown: \['clik'\]"):
        run(compose(overrides))


def _train_cmd(data_dir, run_root, run_id, steps):
    return [sys.executable, "-m", "feedsr.train", *tiny_overrides(data_dir, run_root, run_id),
            f"trainer.max_steps={steps}", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=3",
            "data.num_workers=1", "model.dropout=0.1"]


def test_killed_run_resumes_with_identical_losses(synthetic_dir, tmp_path):
    steps = 24
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    subprocess.run(_train_cmd(synthetic_dir, tmp_path, "straight", steps), check=True, cwd=REPO,
                   env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(synthetic_dir, tmp_path, "killed", steps), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-8" / "COMPLETE").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < steps
    subprocess.run(_train_cmd(synthetic_dir, tmp_path, "killed", steps), check=True, cwd=REPO,
                   env=env, capture_output=True)
    straight = [r["loss"] for r in train_log(tmp_path / "straight")]
    resumed = [r["loss"] for r in train_log(tmp_path / "killed")]
    assert [r["step"] for r in train_log(tmp_path / "killed")] == list(range(1, steps + 1))
    assert resumed == straight  # bit-for-bit on CPU


def test_incomplete_checkpoint_is_ignored(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "partial") + [
        "trainer.max_steps=6", "trainer.checkpoint_every=3"]
    run(compose(overrides))
    run_dir = tmp_path / "partial"
    (run_dir / "checkpoints" / "step-6" / "COMPLETE").unlink()  # as if killed while saving
    assert latest_checkpoint(run_dir).name == "step-3"
    result = run(compose(overrides))
    assert result.step == 6 and len(result.losses) == 3
    assert is_complete(run_dir / "checkpoints" / "step-6")


def test_warm_start_trains_only_on_new_interactions(synthetic_dir, tmp_path):
    base = tiny_overrides(synthetic_dir, tmp_path, "day1") + ["trainer.max_steps=60", "optimizer.lr=0.005"]
    day1 = run(compose(base))
    # "next day": the valid split's rows hold the full history, but only its new impressions are
    # targets; the warm-started model begins from day 1's weights with fresh optimizers.
    warm = tiny_overrides(synthetic_dir, tmp_path, "day2") + [
        "trainer.max_steps=5", "data.train_split=valid", "optimizer.lr=0.005",
        f"trainer.init_from={latest_checkpoint(day1.run_dir)}"]
    cold = tiny_overrides(synthetic_dir, tmp_path, "cold") + [
        "trainer.max_steps=5", "data.train_split=valid", "optimizer.lr=0.005"]
    warm_result, cold_result = run(compose(warm)), run(compose(cold))
    assert warm_result.losses[0] < 0.9 * cold_result.losses[0]
    assert warm_result.step == 5  # a fresh schedule, not day 1's step count
    # history impressions are fed but weigh nothing: flipping their labels leaves the loss as is
    with distributed("cpu") as ctx:
        trainer = Trainer(to_config(compose(warm + ["run_id=day2_check"])), ctx)
        batch = next(trainer.batches())
        history = ~batch.target_mask
        assert history.sum() > 0 and batch.target_mask.sum() > 0  # history rows with new targets
        trainer.model.eval()
        with torch.no_grad():
            logits = trainer.model(batch)
            loss = trainer.loss_fn(logits, batch).loss
            flipped = dataclasses.replace(batch, labels=torch.where(history[:, None], 1 - batch.labels,
                                                                    batch.labels))
            assert trainer.loss_fn(logits, flipped).loss == loss
            targets_only = dataclasses.replace(batch, labels=torch.where(
                batch.target_mask[:, None], 1 - batch.labels, batch.labels))
            assert trainer.loss_fn(logits, targets_only).loss != loss  # the check can fail


def _parameters(trainer) -> dict[str, torch.Tensor]:
    """Every parameter, dense and embedding table (the local shards), copied."""
    out = {}
    for name, value in trainer.model.state_dict().items():
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        out[name] = torch.cat([s.tensor.flatten() for s in shards]) if shards else value.flatten()
    return {k: v.detach().clone() for k, v in out.items()}


def test_non_finite_loss_stops_before_the_update(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "nan") + [
        "trainer.max_steps=50", "trainer.checkpoint_every=1", "optimizer.lr=1e30",
        "optimizer.schedule=constant", "optimizer.grad_clip=0", "optimizer.sparse_lr=1e30"]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step (\d+)") as err:
        run(compose(overrides))
    failed = int(str(err.value).split("step ")[1].split(" ")[0])
    assert latest_checkpoint(tmp_path / "nan").name == f"step-{failed - 1}"
    # step by step: the failing step leaves every parameter, tables included, as it found it
    with distributed("cpu") as ctx:
        trainer = Trainer(to_config(compose(overrides + ["run_id=nan2"])), ctx)
        batches = trainer.batches()
        with pytest.raises(NonFiniteLossError):
            for _ in range(50):
                before = _parameters(trainer)
                trainer.train_step(next(batches))
        after = _parameters(trainer)
    assert trainer.state.step == failed - 1 and any(".ec." in k for k in after)
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed in the failed step"


@pytest.mark.parametrize("override,message", [
    ("trainer.max_stepz=5", "Key 'max_stepz' not in 'TrainerConfig'"),
    ("trainer.max_steps=abc", "Value 'abc' (of type 'str' )?could not be converted to Integer"),
    ("model.head.type=moe", "model.head.type must be mmoe, mlp, linear or dcnv2, got 'moe'"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
])
def test_bad_config_fails_at_start_naming_the_key(override, message):
    # unknown keys and wrong types fail when Hydra composes; bad values when run() validates
    from hydra.errors import HydraException

    with pytest.raises((ConfigError, HydraException)) as err:
        run(compose([override]))
    text = str(err.value) + str(err.value.__cause__ or "")
    assert re.search(message, text), text


def test_cli_rejects_unknown_key():
    out = subprocess.run([sys.executable, "-m", "feedsr.train", "trainer.max_stepz=5"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "max_stepz" in out.stderr


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("trainer", ["default", "hdet"])
def test_every_experiment_config_composes_and_validates(experiment, trainer):
    config = to_config(compose([f"experiment={experiment}", f"trainer={trainer}"]))
    assert config.run_id == experiment
    assert config.trainer.hdet.enabled == (trainer == "hdet")


def test_prune_keeps_the_newest_and_the_protected_checkpoint(tmp_path):
    from feedsr.runtime.checkpoint import COMPLETE, prune

    for step in (10, 20, 30, 40, 50):
        (tmp_path / f"step-{step}").mkdir()
        if step != 50:
            (tmp_path / f"step-{step}" / COMPLETE).write_text("done\n")
    (tmp_path / "step-5").mkdir()  # an interrupted save older than the newest complete one
    prune(tmp_path, keep=2, protect=10)
    # step-50 is incomplete but newer than every complete one: a save may still be writing it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-30", "step-40", "step-50"]
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-30", "step-40", "step-50"]


@pytest.mark.slow
def test_compiled_training_matches_eager(synthetic_dir, tmp_path):
    # torch.compile needs a C++ compiler on CPU and minutes of compiling: behind the slow marker
    # no dropout anywhere (tiny_overrides leaves the MMoE gate's): compiled dropout draws its own
    # RNG, which made even the first losses differ
    same = ["trainer.max_steps=6", "trainer.checkpoint_every=0", "model.head.gate_dropout=0.0"]
    eager = run(compose(tiny_overrides(synthetic_dir, tmp_path, "eager") + same))
    compiled = run(compose(tiny_overrides(synthetic_dir, tmp_path, "compiled") + same + ["trainer.compile=true"]))
    # the first loss precedes any update: the same function of the same weights; later steps drift
    # apart a little (fused kernels round differently)
    assert compiled.losses[0] == pytest.approx(eager.losses[0], rel=1e-4)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-2)
    assert compiled.valid["click"].auc == pytest.approx(eager.valid["click"].auc, abs=1e-2)


# ------------------------------------------------------------------ resume hygiene, logging, config


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_truncates_logs_and_reuses_propensities(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "logs") + [
        "trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.val_every=2",
        "trainer.val_max_rows=256", "trainer.keep_checkpoints=3"]
    run(compose(overrides))
    run_dir = tmp_path / "logs"
    (run_dir / "checkpoints" / "step-8" / "COMPLETE").unlink()  # as if killed before the end
    with open(run_dir / "train_log.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.')  # a line torn by the kill
    # a marked file: resuming must use the run's propensities, not re-estimate them
    saved = json.loads((run_dir / "propensities.json").read_text())
    saved["propensities"][3] = 0.123
    (run_dir / "propensities.json").write_text(json.dumps(saved))
    result = run(compose(overrides))
    assert result.step == 8 and len(result.losses) == 4
    assert _steps(run_dir / "train_log.jsonl") == list(range(1, 9))
    assert _steps(run_dir / "valid_metrics.jsonl") == [2, 4, 6, 8]  # no step twice
    with distributed("cpu") as ctx:
        trainer = Trainer(to_config(compose(overrides + ["trainer.max_steps=9",
                                                         "trainer.allow_config_change=true"])), ctx)
        assert trainer.loss_fn.propensities[3].item() == pytest.approx(0.123)
    # estimated another way (allowed change of the reference task): estimated anew
    with distributed("cpu") as ctx:
        trainer = Trainer(to_config(compose(overrides + ["loss.ipw_reference_task=1",
                                                         "trainer.allow_config_change=true"])), ctx)
        assert trainer.loss_fn.propensities[3].item() != pytest.approx(0.123)


def test_resume_refuses_a_config_that_changes_what_is_learned(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "cfg") + ["trainer.max_steps=3"]
    run(compose(overrides))
    changed = overrides + ["optimizer.lr=0.05", "data.batch_size=16", "data.num_workers=1", "trainer.val_every=1"]
    with pytest.raises(ConfigError, match=r"data.batch_size: 32 -> 16; data.num_workers: 0 -> 1; "
                                          r"optimizer.lr: 0.002 -> 0.05\. "
                                          r"Use another run_id, or trainer.allow_config_change=true"):
        run(compose(changed))
    # logging and evaluation settings may change; the explicit override accepts the rest
    assert run(compose(overrides + ["trainer.val_every=1", "trainer.log_every=2"])).step == 3
    assert run(compose(changed + ["trainer.max_steps=4", "trainer.allow_config_change=true"])).step == 4


@pytest.mark.parametrize("rope_time,rope,changes", [
    (False, "position", []), (True, "time", []), (True, "position", ["model.rope: 'time' -> 'position'"]),
    (False, "learned_time", ["model.rope: 'position' -> 'learned_time'"])])
def test_a_config_saved_before_the_backbone_and_rope_keys_resumes_as_it_was(rope_time, rope, changes):
    """A run saved before model.backbone, model.rope and model.action_value_scale existed (its
    RoPE set by model.rope_time) was the interleaved model: resuming it with the same model is
    no change; another rotation is one."""
    from feedsr.runtime.config import config_changes, to_config

    saved = OmegaConf.to_container(OmegaConf.structured(to_config(compose([]))))
    for key in ("backbone", "rope", "action_value_scale"):
        del saved["model"][key]
    saved["model"]["rope_time"] = rope_time
    assert config_changes(OmegaConf.to_yaml(saved), to_config(compose([f"model.rope={rope}"]))) == changes
    assert config_changes(OmegaConf.to_yaml(saved), to_config(compose(["model.backbone=attnmvp"]))) == (
        ["model.backbone: 'interleaved' -> 'attnmvp'"] + (["model.rope: 'time' -> 'position'"] if rope_time else []))


def test_log_every_sets_the_records(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "every") + ["trainer.max_steps=12", "trainer.log_every=5"]
    result = run(compose(overrides))
    records = [json.loads(x) for x in (tmp_path / "every" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 12]
    means = [sum(result.losses[a:b]) / (b - a) for a, b in ((0, 5), (5, 10), (10, 12))]
    assert [r["loss"] for r in records] == pytest.approx(means, rel=1e-12)


@pytest.mark.parametrize("override,message", [
    ("loss.ipw_reference_task=9", r"loss.ipw_reference_task must be the index of a task in data.tasks"),
    ("optimizer.div_factor=0", r"optimizer.div_factor must be >= 1 .*got 0.0"),
    ("optimizer.betas=[0.9]", r"optimizer.betas must be two values in \[0, 1\), got \[0.9\]"),
    ("loss.ipw_num_positions=0", r"loss.ipw_num_positions must be >= 1, got 0"),
    ("trainer.val_max_rows=0", r"trainer.val_max_rows must be >= 1 or null"),
    ("trainer.log_every=0", r"trainer.log_every must be >= 1, got 0"),
    ("trainer.hdet.clean_batch_rows=0", r"trainer.hdet.clean_batch_rows must be >= 1, got 0"),
    ("trainer.hdet.auto_lr_mode=floor", r"trainer.hdet.auto_lr_mode must be geometric or schedule, got 'floor'"),
    ("trainer.hdet.lr_score=valid", r"trainer.hdet.lr_score must be train or clean, got 'valid'"),
    ("model.residual=none", r"model.residual must be one of rescale, plain, post_ln, got 'none'"),
])
def test_config_holes_fail_at_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose([override]))


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    data = tmp_path / "never_made"
    out = subprocess.run([sys.executable, "-m", "feedsr.train", "optimizer.div_factor=0", f"data.path={data}"],
                         cwd=tmp_path, capture_output=True, text=True)  # any directory: conf ships in the package
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "feedsr: invalid config: optimizer.div_factor must be >= 1 (start = lr / div_factor), got 0.0"]
    assert not data.exists()  # nothing generated before the config was found bad


def test_bad_width_is_found_before_data_is_generated(tmp_path):
    data = tmp_path / "synthetic"
    with pytest.raises(ConfigError, match=r"model width 56 is not divisible by model.num_heads=5"):
        run(compose([f"data.path={data}", "model.num_heads=5", f"output_root={tmp_path}"]))
    assert not data.exists()


def test_resume_refuses_tables_that_no_longer_fit(synthetic_dir, tmp_path):
    """Table sizes left null follow dataset.json: a dataset re-made with other vocabularies must
    not be resumed onto the old tables (it failed deep inside the checkpoint loader, or remapped)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    meta = json.loads((data / "dataset.json").read_text())
    overrides = tiny_overrides(data, tmp_path, "vocab") + ["trainer.max_steps=2", "data.id_tables.author_ids=null"]
    run(compose(overrides))
    recorded = json.loads((tmp_path / "vocab" / "table_sizes.json").read_text())
    assert recorded["author_ids"] == meta["vocab_sizes"]["author_ids"]
    meta["vocab_sizes"]["author_ids"] += 5  # as if re-made from another log
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"author_ids: {recorded['author_ids']} -> {recorded['author_ids'] + 5}"):
        run(compose(overrides))


@pytest.mark.parametrize("override,message", [
    ("trainer.init_from=/no/such/run/checkpoints/step-5", "/no/such/run/checkpoints/step-5: no such checkpoint"),
    ("trainer.device=cuda", "trainer.device=cuda but CUDA is not available"),
])
def test_run_time_user_errors_are_one_line(tmp_path, override, message):
    if override == "trainer.device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    data = tmp_path / "never_made"
    out = subprocess.run([sys.executable, "-m", "feedsr.train", override, f"data.path={data}",
                          f"output_root={tmp_path}"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("feedsr: ") and message in line
    assert not data.exists()


@pytest.mark.parametrize("checkpoint_every", [1, 0])
def test_diverged_update_is_never_saved_and_stops_the_run(synthetic_dir, tmp_path, checkpoint_every):
    """At lr 1e3 step 2's loss is finite but its update makes weights NaN; that state used to be
    saved as COMPLETE, and every restart resumed the poisoned state."""
    from feedsr.runtime.checkpoint import NonFiniteStateError

    overrides = tiny_overrides(synthetic_dir, tmp_path, "diverged") + [
        "trainer.max_steps=6", f"trainer.checkpoint_every={checkpoint_every}", "optimizer.lr=1e3",
        "optimizer.schedule=constant", "optimizer.grad_clip=0",
        # the model this divergence was found with: with the content embedding in the post token
        # step 2's update leaves only optimizer state non-finite and the loss of step 5 stops the run
        "data.dense=[]"]
    expected = (r"step 2: \d+ parameter or optimizer tensor\(s\) hold NaN/inf .*Not saved" if checkpoint_every
                else r"the update of step 2 left non-finite parameters .*stopped before step 3")
    with pytest.raises(NonFiniteStateError, match=expected):
        run(compose(overrides))
    run_dir = tmp_path / "diverged"
    assert _steps(run_dir / "train_log.jsonl") == [1, 2]  # step 2's loss was finite
    latest = latest_checkpoint(run_dir)
    assert (latest.name if latest else None) == ("step-1" if checkpoint_every else None)
    assert not is_complete(run_dir / "checkpoints" / "step-2")
    if checkpoint_every:  # what a restart resumes is finite
        with distributed("cpu") as ctx:
            trainer = Trainer(to_config(compose(overrides)), ctx)
            assert trainer.state.step == 1
            assert all(torch.isfinite(v).all() for v in _parameters(trainer).values())


def test_resume_errors_name_the_real_cause(synthetic_dir, tmp_path, capsys):
    """A missing rank file used to be blamed on a world-size mismatch. With checksums in the
    marker it is found before loading and the run falls back to the previous checkpoint; a marker
    written before checksums still gets the right message."""
    from feedsr.runtime.checkpoint import CheckpointError

    overrides = tiny_overrides(synthetic_dir, tmp_path, "damaged") + ["trainer.max_steps=2", "trainer.checkpoint_every=1"]
    run(compose(overrides))
    step2 = tmp_path / "damaged" / "checkpoints" / "step-2"
    (step2 / "rank-0.pt").unlink()
    capsys.readouterr()
    assert run(compose(overrides)).losses  # resumed from step 1 and redid step 2
    assert "not resuming from a damaged checkpoint: " + str(step2 / "rank-0.pt") + " is missing" in capsys.readouterr().out
    (step2 / "rank-0.pt").unlink()
    (step2 / "COMPLETE").write_text("step 2, world size 1\n")  # a marker from before checksums
    with pytest.raises(CheckpointError, match=r"step-2/rank-0.pt missing: the checkpoint is damaged \(it was saved by 1 ranks"):
        run(compose(overrides))
    (step2 / "COMPLETE").write_text("step 2, world size 2\n")
    with pytest.raises(CheckpointError, match=r"step-2 was saved by 2 ranks, this run has 1; resuming needs the same"):
        run(compose(overrides))

def test_bad_data_in_any_split_is_found_before_step_one(synthetic_dir, tmp_path, capsys):
    """NaN in the valid split or an empty valid directory surfaced only at the final validation,
    after every step had run."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from feedsr.data.schema import DataError

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    first = sorted((data / "valid").glob("*.parquet"))[0]
    table = pq.read_table(first)
    meta = table.schema.metadata
    column = table.column("ctx_post_age").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).copy()
    flat[7] = float("nan")
    table = table.set_column(table.schema.get_field_index("ctx_post_age"), "ctx_post_age",
                             pa.ListArray.from_arrays(column.offsets, pa.array(flat, pa.float32())))
    pq.write_table(table.replace_schema_metadata(meta), first)
    overrides = tiny_overrides(data, tmp_path, "checked") + ["trainer.max_steps=50"]
    with pytest.raises(DataError, match=rf"{first.name}: row group 0, row \d+ .*column 'ctx_post_age' has a non-finite value"):
        run(compose(overrides + ["trainer.check_data=full"]))
    assert not (tmp_path / "checked" / "train_log.jsonl").exists()  # no step ran
    for f in (data / "valid").glob("*.parquet"):
        f.unlink()
    with pytest.raises(DataError, match=r"valid: no \*.parquet files"):
        run(compose(overrides))
    assert not (tmp_path / "checked" / "train_log.jsonl").exists()


def test_batch_larger_than_the_split_is_reported(synthetic_dir, tmp_path, capsys):
    run(compose(tiny_overrides(synthetic_dir, tmp_path, "huge") + ["trainer.max_steps=1", "data.batch_size=100000"]))
    assert re.search(r"warning: the train split has \d+ rows, fewer than one step's 100000", capsys.readouterr().out)


def test_unwritable_checkpoint_directory_is_found_at_start(synthetic_dir, tmp_path):
    from feedsr.runtime.checkpoint import CheckpointError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"a_file/blocked/checkpoints: cannot write checkpoints there"):
        run(compose(tiny_overrides(synthetic_dir, blocker, "blocked") + ["trainer.max_steps=1"]))


def test_restart_after_the_final_validation_writes_it_once(synthetic_dir, tmp_path):
    """A run killed after its final validation was written redoes it on restart: one line per step."""
    overrides = tiny_overrides(synthetic_dir, tmp_path, "final") + ["trainer.max_steps=3", "trainer.evaluate_test=true"]
    run(compose(overrides))
    run(compose(overrides))  # as if restarted after a kill during the test evaluation
    assert _steps(tmp_path / "final" / "valid_metrics.jsonl") == [3]
    assert _steps(tmp_path / "final" / "test_metrics.jsonl") == [3]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_loader_worker_dies_with_a_killed_trainer(synthetic_dir, tmp_path):
    """After a SIGKILL of the trainer its loader worker lingered up to 15 s."""
    cmd = _train_cmd(synthetic_dir, tmp_path, "orphan", 100000)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "orphan" / "train_log.jsonl").exists():  # training, so the worker runs
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert workers, "no loader worker found"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and (Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")]
    assert not alive, f"loader workers {alive} outlived the trainer"


def test_context_moments_of_the_training_split_are_fitted_and_saved(synthetic_dir, tmp_path):
    """The trainer standardises the context and the post token's dense features by the training
    split's moments and the checkpoint carries them (evaluation and serving load the same map);
    with the option off, the identity."""
    dense = ["content_0", "content_3", "content_5", "content_6"]  # width 3 x 8 + 4: an even head dim for RoPE
    overrides = tiny_overrides(synthetic_dir, tmp_path, "norm") + ["trainer.max_steps=2", f"data.dense=[{','.join(dense)}]"]
    context = list(to_config(compose(overrides)).data.context)
    model = load_trained(run(compose(overrides)).run_dir).model
    files = split_files(synthetic_dir, "train")
    for norm, columns in ((model.context_norm, [f"ctx_{c}" for c in context]),
                          (model.dense_norm, [f"dense_{c}" for c in dense])):
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        for k, name in enumerate(columns):  # straight from the Parquet files: every stored impression
            values = pc.list_flatten(table[name]).to_numpy().astype(np.float64)
            assert norm.shift[k].item() == pytest.approx(values.mean(), rel=1e-5, abs=1e-7), name
            assert norm.scale[k].item() == pytest.approx(1 / values.std(), rel=1e-5), name
    off = run(compose(tiny_overrides(synthetic_dir, tmp_path, "no_norm") + [
        "trainer.max_steps=2", "model.context_norm=false"]))
    identity = load_trained(off.run_dir).model.context_norm
    assert not identity.shift.any() and (identity.scale == 1).all()


@pytest.mark.parametrize("name", ["feedsr", "dcnv2"])
def test_context_bins_are_the_training_splits_quantiles_and_saved(synthetic_dir, tmp_path, name):
    """model.context_bins: the edges are each context feature's quantiles over the training
    split's impressions, through the fitted standardisation, and the checkpoint carries them."""
    overrides = tiny_overrides(synthetic_dir, tmp_path, f"bins_{name}") + [
        "trainer.max_steps=2", "model.context_bins=4", "model.context_bin_dim=3"]
    if name == "dcnv2":
        overrides.append("model=dcnv2")
    context = list(to_config(compose(overrides)).data.context)
    model = load_trained(run(compose(overrides)).run_dir).model
    assert type(model).__name__ == {"feedsr": "FeedSR", "dcnv2": "DCNv2Ranker"}[name]
    assert model.context_bins.edges.shape == (len(context), 5)
    table = pa.concat_tables([pq.read_table(f, columns=[f"ctx_{c}" for c in context])
                              for f in split_files(synthetic_dir, "train")])
    for k, c in enumerate(context):  # the tiny split is below the sample size: every impression
        values = torch.tensor(pc.list_flatten(table[f"ctx_{c}"]).to_numpy().astype(np.float64))
        standardised = torch.asinh((values - model.context_norm.shift[k]) * model.context_norm.scale[k])
        expected = torch.quantile(standardised, torch.linspace(0, 1, 5, dtype=torch.float64))
        torch.testing.assert_close(model.context_bins.edges[k].double(), expected, rtol=1e-4, atol=1e-4)


def test_optuna_search_runs_real_trials_and_reports_the_best(synthetic_dir, tmp_path):
    """hparams_search=...: the Hydra Optuna sweeper runs each trial as a full training run in
    its own directory and maximises the score python -m feedsr.train returns."""
    tiny = [o for o in tiny_overrides(synthetic_dir, tmp_path, "unused") if not o.startswith("run_id=")]
    cmd = [sys.executable, "-m", "feedsr.train", "experiment=kuairand_dcnv2", "data=synthetic",
           "hparams_search=kuairand_dcnv2", *tiny, "hydra.sweeper.n_trials=2",
           "trainer.max_steps=choice(4,6)", "data.batch_size=choice(16,32)",  # small, from the CLI
           "trainer.val_every=2", "trainer.checkpoint_every=0", "trainer.select_tasks=[click,like]"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    search = tmp_path / "search_kuairand_dcnv2"
    trials = sorted(search.glob("trial_*"))
    assert [t.name for t in trials] == ["trial_0", "trial_1"]
    scores, params = [], []
    for trial in trials:
        lines = [json.loads(x) for x in (trial / "valid_metrics.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in lines]
        assert steps == list(range(2, steps[-1] + 1, 2)) and steps[-1] in (4, 6)
        scores.append(max((x["metrics"]["click"]["auc"] + x["metrics"]["like"]["auc"]) / 2 for x in lines))
        overrides = (trial / "hydra" / "overrides.yaml").read_text()
        params.append(dict(x[2:].split("=", 1) for x in overrides.splitlines()))
        assert "model.num_layers=1" in overrides and "model.dcn_cross_layers=" in overrides
    results = OmegaConf.load(search / "optimization_results.yaml")
    best = scores.index(max(scores))
    assert results.best_value == pytest.approx(scores[best], abs=1e-12)
    for key, value in results.best_params.items():  # the best trial's sampled values
        assert str(value) == params[best][key], key
    # scripts/search_report.py: every trial's drawn values and best score in one table
    report = subprocess.run([sys.executable, "scripts/search_report.py", str(search), "--json",
                             str(tmp_path / "trials.json")], cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    trials = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert [t["score"] for t in trials] == pytest.approx(scores, abs=1e-12)
    assert [t["params"]["model.dcn_cross_layers"] for t in trials] == [p["model.dcn_cross_layers"] for p in params]
    assert f"best: trial_{best} " in report.stdout and "model.dcn_cross_layers" in report.stdout.splitlines()[0]


def test_kuairand_benchmark_script_reports_seeds_differences_and_history_buckets(synthetic_dir, tmp_path):
    """scripts/benchmark_kuairand.py (make bench-kuairand) end to end, on the tiny synthetic data:
    real runs of both experiments, then each best checkpoint's AUC by history length."""
    tiny = [o for o in tiny_overrides(synthetic_dir, tmp_path, "unused")
            if not o.startswith(("run_id=", "output_root=", "data.path=", "trainer.progress", "trainer.num_threads"))]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "scripts/benchmark_kuairand.py", "--configs", "feedsr", "dcnv2", "--seeds", "0", "1",
           "--parallel", "1", "--data", str(synthetic_dir), "--runs", str(tmp_path / "runs"), "--json", str(out),
           "data=synthetic", *tiny, "trainer.max_steps=4", "trainer.val_every=2", "trainer.checkpoint_every=2",
           "--history-buckets", "0", "20", "--history-seeds", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted((r["config"], r["seed"]) for r in report["runs"]) == [
        ("dcnv2", 0), ("dcnv2", 1), ("feedsr", 0), ("feedsr", 1)]
    for r in report["runs"]:
        best = json.loads((tmp_path / "runs" / f"{r['config']}_seed{r['seed']}" / "best.json").read_text())
        assert r["valid"]["click"]["auc"] == best["metrics"]["click"]["auc"]
        if r["seed"] == 0:  # --history-seeds 1: the breakdown for seed 1's runs only
            assert r["by_history"] is None
            continue
        buckets = r["by_history"]
        assert list(buckets) == ["0-19", "20+"]
        assert sum(b["count"] for b in buckets.values()) == best["metrics"]["click"]["count"]
    feedsr = next(row for row in report["summary"] if row["config"] == "feedsr")
    runs = [r for r in report["runs"] if r["config"] == "feedsr"]
    assert feedsr["click_auc"] == pytest.approx(np.mean([r["valid"]["click"]["auc"] for r in runs]))
    assert [d["task"] for d in report["differences"]] == ["click", "long_view", "like"]
    dcnv2 = next(row for row in report["summary"] if row["config"] == "dcnv2")
    (against,) = report["against_feedsr"]  # every other configuration minus the default
    assert against["config"] == "dcnv2"
    assert against["click"]["difference"] == pytest.approx(dcnv2["click_auc"] - feedsr["click_auc"])
    assert against["click"]["standard_error"] == pytest.approx(report["differences"][0]["standard_error"])
    assert feedsr["by_history"]["0-19"]["click"] == next(r for r in runs if r["seed"] == 1)["by_history"]["0-19"]["click"]
    assert "AUC by history length" in done.stdout


def test_scaling_script_counts_flops_fits_the_frontier_and_plots(synthetic_dir, tmp_path):
    """scripts/scaling.py end to end on the tiny data: real runs of two sizes at two budgets,
    their counted FLOPs (more for the wider model and the longer budget), the frontier fit and
    the PNG; a second call reuses every run."""
    tiny = [o for o in tiny_overrides(synthetic_dir, tmp_path, "unused")
            if o.startswith(("data.", "model.head.", "model.position_bias", "trainer.log_every"))
            and not o.startswith(("data.path=", "data.batch_size="))]
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    cmd = [sys.executable, "scripts/scaling.py", "--sizes", "xs", "s", "--steps", "2", "4", "--parallel", "1",
           "--flop-batches", "1", "--data", str(synthetic_dir), "--runs", str(tmp_path / "runs"),
           "--json", str(out), "--png", str(png), "data=synthetic", *tiny, "trainer.val_max_rows=64"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    points = {(p["size"], p["steps"]): p for p in report["points"]}
    assert sorted(points) == [("s", 2), ("s", 4), ("xs", 2), ("xs", 4)]
    for size in ("xs", "s"):
        assert points[size, 4]["flops"] == pytest.approx(2 * points[size, 2]["flops"])
    assert points["s", 2]["flops"] > points["xs", 2]["flops"] > 0
    for r in report["runs"]:
        best = json.loads((tmp_path / "runs" / f"{r['size']}_steps{r['steps']}_seed0" / "best.json").read_text())
        assert r["auc"] == pytest.approx((best["metrics"]["click"]["auc"] + best["metrics"]["long_view"]["auc"]) / 2)
        assert f"model.d_model={16 if r['size'] == 'xs' else 32}" in r["command"]
    assert report["fit"]["points"] >= 1 and png.stat().st_size > 1000
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(out.read_text())["runs"] == report["runs"]


def test_scaling_fit_is_least_squares_on_the_frontier():
    sys.path.insert(0, str(REPO / "scripts"))
    from scaling import fit, frontier

    points = [{"flops": 1e9, "auc": 0.60}, {"flops": 1e10, "auc": 0.62}, {"flops": 3e10, "auc": 0.61},
              {"flops": 1e11, "auc": 0.64}]
    best = frontier(points)
    assert [p["flops"] for p in best] == [1e9, 1e10, 1e11]  # 3e10 is beaten by a cheaper run
    line = fit(best)
    assert line["slope_per_10x"] == pytest.approx(0.02) and line["slope_se"] == pytest.approx(0.0, abs=1e-12)
    assert line["intercept"] == pytest.approx(0.60 - 9 * 0.02)
