"""The trainer end to end on real synthetic data: learning, checkpoints, exact resume after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose, tiny_overrides
from feedsr.eval.scoring import evaluate_checkpoint
from feedsr.train.checkpoint import is_complete, latest_checkpoint
from feedsr.train.config import ConfigError, to_config
from feedsr.train.trainer import NonFiniteLossError, run


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
                                         "optimizer.lr=0.005"]))
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
    with pytest.raises(ConfigError, match=r"trainer.select_tasks names unknown tasks \['clik'\]"):
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


def test_non_finite_loss_stops_before_the_update(synthetic_dir, tmp_path):
    overrides = tiny_overrides(synthetic_dir, tmp_path, "nan") + [
        "trainer.max_steps=50", "trainer.checkpoint_every=1", "optimizer.lr=1e30",
        "optimizer.schedule=constant", "optimizer.grad_clip=0", "optimizer.sparse_lr=1e30"]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step (\d+)") as err:
        run(compose(overrides))
    failed = int(str(err.value).split("step ")[1].split(" ")[0])
    assert latest_checkpoint(tmp_path / "nan").name == f"step-{failed - 1}"


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
    from feedsr.train.checkpoint import COMPLETE, prune

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
    base = tiny_overrides(synthetic_dir, tmp_path, "eager") + ["trainer.max_steps=6", "trainer.checkpoint_every=0"]
    eager = run(compose(base))
    compiled = run(compose(tiny_overrides(synthetic_dir, tmp_path, "compiled")
                           + ["trainer.max_steps=6", "trainer.checkpoint_every=0", "trainer.compile=true"]))
    # the first loss precedes any update: the same function of the same weights; later steps drift
    # apart a little (fused kernels round differently, and compiled dropout draws its own RNG)
    assert compiled.losses[0] == pytest.approx(eager.losses[0], rel=1e-4)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-2)
    assert compiled.valid["click"].auc == pytest.approx(eager.valid["click"].auc, abs=1e-2)
