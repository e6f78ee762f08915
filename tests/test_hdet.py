"""HDET: the math by hand, and the behaviour in real gloo processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import REPO, compose, free_port, run_ranks, tiny_overrides
from feedsr.runtime.config import HDETConfig
from feedsr.train.hdet import HDET, Explorer, decay_factor, meta_delta, multiplier
from feedsr.train.optim import OneCycle

SCHEDULE = OneCycle(peak=0.01, total_steps=100, warmup_pct=0.1, div_factor=25, final_div_factor=1e3)


def hdet_for(rank, world_size, **cfg):
    return HDET(HDETConfig(enabled=True, **cfg), rank, world_size, SCHEDULE,
                ["transformer", "dense", "no_decay"], {"dropout": 0.1}, 100)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_multipliers_spread_evenly_with_mean_one(world_size):
    rho = [multiplier(i, world_size, 1 / 9) for i in range(world_size)]
    assert math.isclose(sum(rho) / world_size, 1.0, abs_tol=1e-12)
    if world_size > 1:
        assert math.isclose(min(rho), 1 - 1 / 9) and math.isclose(max(rho), 1 + 1 / 9)
        assert np.allclose(np.diff(rho), np.diff(rho)[0])
    if world_size == 8:  # the paper's N=8 example: 0.0008 .. 0.001 around 0.0009
        assert np.allclose([0.0009 * r for r in (rho[0], rho[-1])], [0.0008, 0.001])


def test_rates_differ_from_step_one_and_average_to_the_schedule():
    ranks = [hdet_for(r, 4) for r in range(4)]
    for step in (0, 1, 50):
        lrs = [h.learning_rates(step) for h in ranks]
        for group in ("transformer", "dense", "no_decay"):
            values = [lr[group] for lr in lrs]
            assert len(set(values)) == 4
            assert math.isclose(sum(values) / 4, SCHEDULE(step), rel_tol=1e-12)


def test_permutations_agree_across_ranks_and_differ_across_groups():
    ranks = [hdet_for(r, 8) for r in range(8)]
    for _ in range(5):
        perms = [{g: e.perm for g, e in h.lr.items()} for h in ranks]
        assert all(p == perms[0] for p in perms)
        for h in ranks:
            h._update_learning_rates(10, np.linspace(1.0, 1.7, 8))
    groups = list(perms[0].values())
    assert groups[0] != groups[1] or groups[1] != groups[2]


def test_meta_update_matches_hand_computation():
    h = hdet_for(0, 4, warm_steps=0, converge_every=10, sigma=0.1, lam=0.5, beta=0.9, auto_lr_mode="geometric")
    losses = np.array([1.00, 0.95, 1.05, 0.90])
    step = 20
    # the rates the window (steps 10..19) trained with, not the next step's
    values = np.array([np.mean([h.learning_rates(t, r)["dense"] for t in range(10, 20)]) for r in range(4)])
    assert not np.allclose(values, [h.learning_rates(step, r)["dense"] for r in range(4)])
    # by hand
    s = (losses.mean() - losses) / 0.1
    w = np.exp(s) / np.exp(s).sum()
    delta = (w * values).sum() - values.mean()
    v = 0.9 * 0.0 + 0.1 * delta
    remaining = math.ceil((100 - step) / 10)
    gamma = 1 - (SCHEDULE.floor / SCHEDULE(step)) ** (1 / remaining)
    expected = (1 - gamma) * SCHEDULE(step) + 0.5 * v
    h._update_learning_rates(step, losses)
    assert math.isclose(h.lr["dense"].base, expected, rel_tol=1e-12)
    assert math.isclose(h.lr["dense"].velocity, v, rel_tol=1e-12)
    assert math.isclose(meta_delta(losses, values, 0.1), delta, rel_tol=1e-12)
    # the decay pulls toward the floor (the reference code's sign error grew it ~400x)
    assert 0 < gamma < 1 and h.lr["dense"].base < SCHEDULE(step) + 0.5 * v + 1e-15


def test_base_decays_to_the_floor_without_signal_and_is_clamped():
    h = hdet_for(0, 4, converge_every=10, lr_max_factor=2.0, auto_lr_mode="geometric")
    for step in range(10, 101, 10):
        h._update_learning_rates(step, np.ones(4))  # equal losses: no velocity
    assert math.isclose(h.lr["dense"].base, SCHEDULE.floor, rel_tol=1e-9)
    assert decay_factor(SCHEDULE.floor, SCHEDULE.floor, 3) == 0.0
    e = Explorer("x", 0.5, 4, np.random.default_rng(0))
    e.base = 1.0
    e.update(np.array([1.0, 0.0, 1.0, 1.0]), np.array([10.0, 1000.0, 1.0, 1.0]), 0.1, 0.0, 1.0, 0.0, 0.0, 2.0)
    assert e.base == 2.0  # clamped


def test_schedule_mode_steers_a_factor_on_the_schedule():
    """auto_lr_mode=schedule: the base is a factor on OneCycle, moved by the replicas' losses and
    never decayed, so the run keeps the schedule's shape; the replica that trained with the highest
    rate over the window winning raises the factor, by the hand-computed amount."""
    h = hdet_for(0, 4, warm_steps=0, converge_every=10, auto_lr_mode="schedule", lr_max_factor=3.0)
    explorer = h.lr["dense"]
    rho = np.array([explorer.rho(r) for r in range(4)])
    losses = np.where(rho == rho.max(), 0.9, 1.0)  # the fastest replica had the lowest loss
    s = (losses.mean() - losses) / 0.1
    w = np.exp(s) / np.exp(s).sum()
    expected = 1.0 + 0.5 * 0.1 * ((w * rho).sum() - rho.mean())
    h._update_learning_rates(20, losses)
    assert math.isclose(explorer.base, expected, rel_tol=1e-12) and explorer.base > 1
    for step in (25, 60, 99):  # between converges: the schedule times the factor, spread around it
        values = [h.learning_rates(step, r)["dense"] for r in range(4)]
        assert math.isclose(np.mean(values), expected * SCHEDULE(step), rel_tol=1e-12)
        assert math.isclose(h.base_learning_rates(step)["dense"], expected * SCHEDULE(step), rel_tol=1e-12)
    for step in range(30, 101, 10):  # equal losses: no signal, no decay (the geometric mode decays)
        h._update_learning_rates(step, np.ones(4))
    assert explorer.base > 1
    for step in range(10, 400, 10):  # always the fastest replica wins: clamped at lr_max_factor
        rho = np.array([explorer.rho(r) for r in range(4)])
        h._update_learning_rates(step, np.where(rho == rho.max(), 0.0, 1.0))
    assert explorer.base == 3.0


def test_window_rates_follow_the_schedule_before_the_first_update():
    h = hdet_for(2, 4, converge_every=10)
    used = h.window_learning_rates(30, 10)
    for r in range(4):
        for i, g in enumerate(h.lr):
            expected = np.mean([SCHEDULE(t) * h.lr[g].rho(r) for t in range(20, 30)])
            assert math.isclose(used[r, i], expected, rel_tol=1e-12)


def test_dropout_scalar_scales_configured_rates_and_keeps_zeros():
    """The explored dropout multiplies each module's own rate: a dropout configured 0 stays off
    (it used to be overwritten with the explored value, attention and head included)."""
    from conftest import MODEL_SPEC

    from feedsr.model import build_model
    from feedsr.model.config import ModelConfig
    from feedsr.model.heads import HeadConfig
    from feedsr.model.transformer import SelfAttention
    from feedsr.train.hdet import scale_dropout

    cfg = ModelConfig(embedding_dim=8, dropout=0.2, attn_dropout=0.0,
                      head=HeadConfig(gate_dropout=0.1, dropout=0.0))
    model = build_model(cfg, MODEL_SPEC, 16, device=torch.device("cpu"))
    before = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert {0.0, 0.1, 0.2} <= set(before)
    for scale in (1.5, 0.5):  # twice: the configured rates are remembered, not compounded
        scale_dropout(model, scale)
        after = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert after == pytest.approx([p * scale for p in before])
        assert all(m.attn_dropout == 0.0 for m in model.modules() if isinstance(m, SelfAttention))


def test_state_round_trip_keeps_own_rank():
    a = hdet_for(1, 4)
    a._update_learning_rates(30, np.array([1.0, 0.9, 1.1, 1.0]))
    b = hdet_for(3, 4)
    b.load_state_dict(a.state_dict())
    assert b.rank == 3
    assert b.learning_rates(40) == a.learning_rates(40, rank=3)
    other = hdet_for(3, 4, auto_lr_mode="geometric")  # a base that is a factor is no learning rate
    with pytest.raises(ValueError, match="saved with trainer.hdet.auto_lr_mode=schedule; set "
                                         "trainer.hdet.auto_lr_mode=schedule to resume it"):
        other.load_state_dict(a.state_dict())
    old = {k: v for k, v in hdet_for(1, 4, auto_lr_mode="geometric").state_dict().items() if k != "auto_lr_mode"}
    other.load_state_dict(old)  # saved before the modes existed: geometric
    with pytest.raises(ValueError, match="auto_lr_mode=geometric"):
        b.load_state_dict(old)


# ---------------------------------------------------------------------------------- real processes


def _trainer(rank, world_size, data_dir, run_root, run_id, extra):
    from feedsr.runtime.config import to_config
    from feedsr.runtime.distributed import distributed
    from feedsr.train.trainer import Trainer

    overrides = tiny_overrides(Path(data_dir), Path(run_root), run_id) + [
        "trainer.max_steps=12", "trainer.checkpoint_every=0", "trainer=hdet",
        "trainer.hdet.converge_every=3", "trainer.hdet.warm_steps=3", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.num_threads=1", "data.num_workers=0"] + extra
    config = to_config(compose(overrides))
    ctx = distributed(config.trainer.device)
    return Trainer(config, ctx.__enter__())


def _gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _dense_fingerprint(trainer):
    return [p.detach().clone() for p in trainer.dense_params()]


def _same_everywhere(tensors) -> bool:
    everyone = _gather([t.numpy() for t in tensors])
    return all(all(np.array_equal(a, b) for a, b in zip(everyone[0], other)) for other in everyone[1:])


def _table_shards(trainer):
    state = trainer.model.state_dict()
    return {k: [s.tensor.clone() for s in v.local_shards()] for k, v in state.items() if ".ec." in k}


def _converge_behaviour(rank, world_size, data_dir, run_root, out, extra):
    trainer = _trainer(rank, world_size, data_dir, run_root, "conv", extra)
    batches = trainer.batches()
    log = []
    for _ in range(7):
        loss, local, _, _ = trainer.train_step(next(batches))
        trainer.hdet.record_loss(local)
        lrs = trainer.learning_rates()
        if trainer.hdet.is_converge_step(trainer.state.step):
            tables = _table_shards(trainer)
            trainer.converge()
            after = _table_shards(trainer)
            assert all(torch.equal(a, b) for k in tables for a, b in zip(tables[k], after[k])), \
                "averaging touched a sharded table"
            log.append(("converged", trainer.state.step, _same_everywhere(_dense_fingerprint(trainer))))
        else:
            log.append(("between", trainer.state.step, _same_everywhere(_dense_fingerprint(trainer))))
        log.append(("lrs", trainer.state.step, _gather(lrs)))
        log.append(("schedule", trainer.state.step, trainer.schedule(trainer.state.step)))
    log.append(("perms", 0, _gather({g: e.perm for g, e in trainer.hdet.lr.items()})))
    log.append(("ddp", 0, type(trainer.model._dmp_wrapped_module).__name__))
    if rank == 0:
        Path(out).write_text(json.dumps(log))


@pytest.mark.parametrize("mode,auto_lr,score,lr_mode", [
    ("sync", True, "train", "geometric"), ("sync", False, "train", "schedule"),
    ("independent", True, "train", "schedule"), ("sync", True, "clean", "schedule")])
def test_converge_in_real_processes(synthetic_dir, tmp_path, mode, auto_lr, score, lr_mode):
    out = tmp_path / "log.json"
    extra = [f"trainer.hdet.mode={mode}", f"trainer.hdet.auto_lr={str(auto_lr).lower()}",
             f"trainer.hdet.lr_score={score}", "trainer.hdet.clean_batch_rows=32",
             f"trainer.hdet.auto_lr_mode={lr_mode}"]
    run_ranks(_converge_behaviour, 2, str(synthetic_dir), str(tmp_path), str(out), extra)
    log = json.loads(out.read_text())
    states = {(kind, step): value for kind, step, value in log}
    for step in (3, 6):
        assert states[("converged", step)] is True, f"replicas differ right after the converge at {step}"
    for step in (1, 2, 4, 5, 7):
        assert states[("between", step)] is False, f"replicas identical between converges (step {step})"
    for step in range(1, 8):
        rank0, rank1 = states[("lrs", step)]
        assert rank0["dense"] != rank1["dense"]
    perms = states[("perms", 0)]
    assert perms[0] == perms[1]
    assert states[("ddp", 0)] == ("DistributedDataParallel" if mode == "sync" else "FeedSR")
    for step in range(1, 8):  # the spread averages to the base; without auto-LR that's the schedule
        rank0, rank1 = states[("lrs", step)]
        mean = (rank0["dense"] + rank1["dense"]) / 2
        if not auto_lr or step < 3:
            assert math.isclose(mean, states[("schedule", step)], rel_tol=1e-12)
    if auto_lr:  # after the first meta-update (step 3 >= warm_steps) the base is HDET's own
        rank0, rank1 = states[("lrs", 7)]
        assert not math.isclose((rank0["dense"] + rank1["dense"]) / 2, states[("schedule", 7)])
    converges = [json.loads(x) for x in (tmp_path / "conv" / "hdet_converges.jsonl").read_text().splitlines()]
    for c in converges:  # the losses that scored the rates: every replica's, of the kind asked for
        assert c["updated"] is auto_lr and ("clean_losses" in c) is (score == "clean")
        if auto_lr:
            assert c["lr_losses"] == c["clean_losses" if score == "clean" else "window_losses"]
            assert len(set(c["lr_losses"])) == 2


def _independent_no_sync(rank, world_size, data_dir, run_root, out):
    # alpha = 0: equal learning rates. Only unsynchronized gradients can make replicas differ.
    trainer = _trainer(rank, world_size, data_dir, run_root, "nosync",
                       ["trainer.hdet.mode=independent", "trainer.hdet.alpha=0.0"])
    sync = _trainer(rank, world_size, data_dir, run_root, "sync",
                    ["trainer.hdet.mode=sync", "trainer.hdet.alpha=0.0"])
    results = []
    for t in (trainer, sync):
        t.train_step(next(t.batches()))
        results.append(_same_everywhere(_dense_fingerprint(t)))
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def test_independent_mode_does_not_synchronize_gradients(synthetic_dir, tmp_path):
    out = tmp_path / "r.json"
    run_ranks(_independent_no_sync, 2, str(synthetic_dir), str(tmp_path), str(out))
    independent_same, sync_same = json.loads(out.read_text())
    assert sync_same is True and independent_same is False


def _torchrun(data_dir, run_root, run_id, steps, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m", "feedsr.train",
            *tiny_overrides(data_dir, run_root, run_id), "trainer=hdet", f"trainer.max_steps={steps}",
            "trainer.hdet.converge_every=4", "trainer.hdet.warm_steps=4", "trainer.checkpoint_every=6",
            "trainer.keep_checkpoints=3", "trainer.val_max_rows=1024", "model.dropout=0.1",
            "data.num_workers=0", *extra]


def test_killed_hdet_run_resumes_each_rank_exactly(synthetic_dir, tmp_path):
    steps, env = 20, os.environ | {"PYTHONUNBUFFERED": "1"}
    subprocess.run(_torchrun(synthetic_dir, tmp_path, "straight", steps), check=True, cwd=REPO,
                   env=env, capture_output=True)
    proc = subprocess.Popen(_torchrun(synthetic_dir, tmp_path, "killed", steps), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "killed" / "checkpoints" / "step-12" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint to kill after"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    subprocess.run(_torchrun(synthetic_dir, tmp_path, "killed", steps), check=True, cwd=REPO,
                   env=env, capture_output=True)

    def log(run):
        return [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]

    straight, resumed = log("straight"), log("killed")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["rank_lrs"] for r in resumed] == [r["rank_lrs"] for r in straight]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert (tmp_path / "straight" / "hdet_learning_rates.png").stat().st_size > 0
    converges = [json.loads(x) for x in (tmp_path / "killed" / "hdet_converges.jsonl").read_text().splitlines()]
    assert any(c["updated"] for c in converges)


def test_two_process_validation_matches_single_process_metrics(synthetic_dir, tmp_path):
    """A 2-process run of the default model trains; its (reduced) validation metrics over the
    split's first val_max_rows rows equal what one process computes on those rows from the same
    checkpoint (the cap is in global rows: it used to be batches per rank)."""
    from feedsr.eval.scoring import evaluate_checkpoint
    from feedsr.runtime.checkpoint import latest_checkpoint
    from feedsr.runtime.config import to_config

    cmd = _torchrun(synthetic_dir, tmp_path, "two", 40, ["trainer=default", "optimizer.lr=0.005",
                                                          "trainer.val_max_rows=300"])
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    logged = json.loads((tmp_path / "two" / "valid_metrics.jsonl").read_text().splitlines()[-1])["metrics"]
    config = to_config(compose(tiny_overrides(synthetic_dir, tmp_path, "two")))
    single = evaluate_checkpoint(config, latest_checkpoint(tmp_path / "two"), "valid", max_rows=300)
    everything = evaluate_checkpoint(config, latest_checkpoint(tmp_path / "two"), "valid")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert single["click"].count < everything["click"].count  # the cap took effect
    for task, m in single.items():
        assert logged[task]["count"] == m.count
        assert logged[task]["auc"] == pytest.approx(m.auc, abs=1e-4)
    assert logged["click"]["auc"] > 0.55


def _scalars_and_noise(rank, world_size, data_dir, run_root, out):
    from feedsr.model.transformer import SelfAttention

    scalars = ("trainer.hdet.scalars=[{name: dropout, alpha: 0.5},"
               "{name: weight_decay, alpha: 0.5},{name: attention_temperature, alpha: 0.2, min_value: 0.5,"
               " max_value: 2.0}]")
    clean = _trainer(rank, world_size, data_dir, run_root, "plain", ["trainer.hdet.noise=0.0"])
    noisy = _trainer(rank, world_size, data_dir, run_root, "noisy",
                     ["trainer.hdet.noise=0.01", scalars, "model.dropout=0.1"])
    # warm noisy start: identical initialisation plus per-rank noise of relative size ~nu
    rel = [float((n - c).norm() / c.norm()) for n, c in zip(_dense_fingerprint(noisy), _dense_fingerprint(clean))
           if c.norm() > 0 and c.numel() > 100]
    record = {"noise_rel": rel, "noisy_same": _same_everywhere(_dense_fingerprint(noisy)),
              "plain_same": _same_everywhere(_dense_fingerprint(clean))}

    def applied(t):  # the dropout scale each module applies to its configured rate (0: none)
        drop = {round(m.p / m.configured_p, 9) for m in t.model.modules()
                if isinstance(m, torch.nn.Dropout) and m.configured_p > 0}
        temp = {m.temperature for m in t.model.modules() if isinstance(m, SelfAttention)}
        wd = {g["weight_decay"] for g in t.dense_optimizer.param_groups if g["name"] != "no_decay"}
        return {"dropout": drop, "temperature": temp, "weight_decay": wd}

    before = noisy.hdet.scalar_values()
    record["applied_matches"] = applied(noisy) == {"dropout": {round(before["dropout"], 9)},
                                                   "temperature": {before["attention_temperature"]},
                                                   "weight_decay": {before["weight_decay"]}}
    record["values"] = _gather(before)
    batches = noisy.batches()
    for _ in range(3):
        _, local, _, _ = noisy.train_step(next(batches))
        noisy.hdet.record_loss(local)
    noisy.converge()
    record["clean_losses"] = json.loads((Path(run_root) / "noisy" / "hdet_converges.jsonl")
                                        .read_text().splitlines()[-1])["clean_loss"] if rank == 0 else None
    record["after"] = noisy.hdet.scalar_values()
    record["applied_after"] = applied(noisy)["dropout"] == {round(record["after"]["dropout"], 9)}
    if rank == 0:
        Path(out).write_text(json.dumps(record))


def test_scalars_and_warm_noisy_start_in_real_processes(synthetic_dir, tmp_path):
    out = tmp_path / "r.json"
    run_ranks(_scalars_and_noise, 2, str(synthetic_dir), str(tmp_path), str(out))
    r = json.loads(out.read_text())
    assert r["plain_same"] is True and r["noisy_same"] is False
    assert all(0.002 < x < 0.05 for x in r["noise_rel"]), r["noise_rel"]  # nu = 0.01 per tensor
    assert r["applied_matches"] and r["applied_after"]
    rank0, rank1 = r["values"]
    assert all(rank0[k] != rank1[k] for k in rank0)  # every scalar fanned out across replicas
    for name, base in (("dropout", 1.0), ("weight_decay", 0.01), ("attention_temperature", 1.0)):
        assert math.isclose((rank0[name] + rank1[name]) / 2, base, rel_tol=1e-12)
    assert isinstance(r["clean_losses"], float) and math.isfinite(r["clean_losses"])


@pytest.mark.gpu
def test_converge_under_nccl_on_one_gpu(tmp_path):
    """HDET's converge under NCCL, which takes CUDA tensors only: its loss all-gather was a CPU
    float64 tensor and failed at the first converge of every GPU run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        h = hdet_for(0, 1, converge_every=1, warm_steps=0)
        params = [torch.randn(5, 3, device="cuda"), torch.randn(7, device="cuda")]
        before = [p.clone() for p in params]
        h.record_loss(0.7)
        report = h.converge(10, params, clean_loss=0.5)
        assert report["window_losses"] == [pytest.approx(0.7)] and report["updated"]
        assert all(torch.equal(a, b) and a.is_cuda for a, b in zip(params, before))  # mean of one
    finally:
        dist.destroy_process_group()


def test_clean_batch_is_a_training_holdout_never_trained_on(synthetic_dir, tmp_path):
    """HDET's clean loss used the first rows of the valid split, which also picks checkpoints; it
    now scores the training split's first clean_batch_rows rows, which training never reads."""
    import pyarrow.parquet as pq

    from feedsr.runtime.config import to_config
    from feedsr.runtime.distributed import distributed
    from feedsr.train.trainer import Trainer

    rows = 40
    overrides = tiny_overrides(synthetic_dir, tmp_path, "holdout") + [
        "trainer=hdet", "trainer.max_steps=2", f"trainer.hdet.clean_batch_rows={rows}",
        "trainer.hdet.scalars=[{name: dropout, alpha: 0.5}]", "data.session_shuffle=false"]
    first = sorted((synthetic_dir / "train").glob("*.parquet"))[0]
    head = pq.read_table(first, columns=["member_id", "timestamps"]).slice(0, rows)
    expected = sorted(zip(head["member_id"].to_pylist(), (t[-1] for t in head["timestamps"].to_pylist())))
    key = lambda b: sorted(zip(b.member_ids.tolist(), (b.timestamps[o - 1].item() for o in b.offsets[1:])))  # noqa: E731
    with distributed("cpu") as ctx:
        trainer = Trainer(to_config(compose(overrides)), ctx)
        assert key(trainer.clean_batch) == expected  # exactly those rows, from the training split
        trained = [k for batch in trainer.train_loader for k in key(batch)]
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in (synthetic_dir / "train").glob("*.parquet"))
    assert len(trained) == total - rows and not set(expected) & set(trained)


def test_hdet_experiment_script_runs_reuses_and_counts_communication(synthetic_dir, tmp_path):
    """scripts/hdet_experiment.py end to end on the tiny data: HDET with synchronous and with
    independent replicas in real torchrun processes, the JSON's figures from the runs' own logs,
    the values communicated per step from the converges, and a rerun reusing the finished runs."""
    out, runs = tmp_path / "replicas.json", tmp_path / "runs"
    cmd = [sys.executable, "scripts/hdet_experiment.py", "replicas", "--nproc", "2", "--seeds", "0",
           "--steps", "4", "--converge-every", "2", "--modes", "schedule", "--data", str(synthetic_dir),
           "--runs", str(runs), "--out", str(out), "--collapse-auc", "0"]  # 4 steps: any AUC counts
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["summary"]}
    assert list(rows) == ["hdet_schedule_top", "hdet_schedule_top_independent"]
    sync, independent = rows["hdet_schedule_top"], rows["hdet_schedule_top_independent"]
    run = next(r for r in report["runs"] if r["config"] == "hdet_schedule_top")
    conv = [json.loads(x) for x in (runs / "hdet_schedule_top_seed0" / "hdet_converges.jsonl").read_text().splitlines()]
    assert [c["step"] for c in conv] == [2, 4] and run["converges"] == 2
    n = conv[-1]["averaged_values"]
    assert n > 1000 and sync["communicated_per_step"] == n + n * 2 / 4
    assert independent["communicated_per_step"] == n * 2 / 4
    valid = json.loads((runs / "hdet_schedule_top_seed0" / "valid_metrics.jsonl").read_text().splitlines()[-1])
    assert sync["click_auc"] == valid["metrics"]["click"]["auc"] and sync["diverged"] == 0
    assert "| hdet_schedule_top_independent | 0/1 | " in done.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads(out.read_text())["runs"] == report["runs"]  # reused, seconds included
