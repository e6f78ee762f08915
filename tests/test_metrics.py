"""Ranking metrics: AUC and NE against direct formulas, masks, the oracle, and a real 2-rank gather."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from feedsr.runtime.distributed import free_port
from feedsr.eval.metrics import MetricAccumulator, format_table, log_loss, roc_auc

TASKS = ["click", "like"]


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Over all (positive, negative) pairs: 1 if the positive scores higher, 1/2 on a tie."""
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    doubled_wins = int((2 * (pos > neg) + (pos == neg)).sum())
    return doubled_wins / (2 * pos.size * neg.size)


def random_shard(seed: int, n: int):
    """logits, labels, mask, true_probs for TASKS; click has a true probability, like has none."""
    g = torch.Generator().manual_seed(seed)
    true_probs = torch.rand(n, 2, generator=g) * 0.3
    labels = (torch.rand(n, 2, generator=g) < true_probs).float()
    logits = torch.logit(true_probs, eps=1e-3) + torch.randn(n, 2, generator=g)
    mask = torch.rand(n, generator=g) < 0.7
    true_probs[:, 1] = math.nan
    return logits, labels, mask, true_probs


@pytest.mark.parametrize("seed", range(20))
def test_auc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    # Few distinct scores, so most pairs tie; base rates from 2% to 98%.
    scores = rng.integers(0, int(rng.integers(1, 8)), n) / 7.0
    labels = rng.random(n) < rng.uniform(0.02, 0.98)
    labels[:2] = [True, False]
    assert roc_auc(scores, labels) == brute_force_auc(scores, labels)
    continuous = rng.random(n)
    assert roc_auc(continuous, labels) == brute_force_auc(continuous, labels)


def test_auc_known_cases():
    labels = np.array([False, False, True, False, True])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.8])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0
    assert roc_auc(np.full(5, 0.4), labels) == 0.5
    assert math.isnan(roc_auc(scores, np.ones(5, bool)))
    assert math.isnan(roc_auc(scores, np.zeros(5, bool)))


def test_ne_and_logloss_match_direct_formula():
    logits, labels, mask, _ = random_shard(seed=0, n=500)
    logits[0, 0] = 40.0  # sigmoid rounds to 1.0: the clip keeps the loss finite
    labels[0, 0] = 0.0
    acc = MetricAccumulator(TASKS)
    acc.update(logits, labels)
    m = acc.compute()["click"]
    p = np.clip(torch.sigmoid(logits[:, 0].double()).numpy(), 1e-7, 1 - 1e-7)
    y = labels[:, 0].double().numpy()
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    b = y.mean()
    assert m.logloss == pytest.approx(logloss, rel=1e-12)
    assert m.ne == pytest.approx(logloss / -(b * np.log(b) + (1 - b) * np.log(1 - b)), rel=1e-12)
    assert m.count == 500 and m.positives == int(y.sum()) and m.base_rate == pytest.approx(b)
    assert m.calibration == pytest.approx(p.mean() / b) and m.mean_pred == pytest.approx(p.mean())


def test_predicting_the_base_rate_gives_ne_and_calibration_one():
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0], [0.0]])
    acc = MetricAccumulator(["click"], from_logits=False)
    acc.update(torch.full((5, 1), 0.4, dtype=torch.float64), labels)
    m = acc.compute()["click"]
    assert m.ne == pytest.approx(1.0, rel=1e-12) and m.calibration == pytest.approx(1.0, rel=1e-12)
    assert m.auc == 0.5


def test_probabilities_and_logits_agree():
    logits, labels, mask, true_probs = random_shard(seed=1, n=300)
    from_logits, from_probs = MetricAccumulator(TASKS), MetricAccumulator(TASKS, from_logits=False)
    from_logits.update(logits, labels, mask, true_probs)
    from_probs.update(torch.sigmoid(logits.double()), labels, mask, true_probs)
    assert from_logits.compute() == from_probs.compute()


def test_mask_keeps_only_marked_rows():
    logits, labels, mask, true_probs = random_shard(seed=2, n=300)
    masked, filtered = MetricAccumulator(TASKS), MetricAccumulator(TASKS)
    masked.update(logits, labels, mask, true_probs)
    filtered.update(logits[mask], labels[mask], true_probs=true_probs[mask])
    assert masked.compute() == filtered.compute()
    assert masked.compute()["click"].count == int(mask.sum()) < 300


def test_oracle_only_with_true_probabilities():
    logits, labels, mask, true_probs = random_shard(seed=3, n=400)
    with_truth, without = MetricAccumulator(TASKS), MetricAccumulator(TASKS)
    with_truth.update(logits, labels, mask, true_probs)
    without.update(logits, labels, mask)
    m = with_truth.compute()
    y = labels[mask, 0].bool().numpy()
    truth = true_probs[mask, 0].double().numpy()
    assert m["click"].oracle_auc == roc_auc(truth, y)
    base_rate_loss = log_loss(np.full_like(truth, y.mean()), y)
    assert m["click"].oracle_ne == pytest.approx(log_loss(truth, y) / base_rate_loss)
    auc = roc_auc(logits[mask, 0].double().numpy(), y)
    assert m["click"].oracle_fraction == pytest.approx((auc - 0.5) / (m["click"].oracle_auc - 0.5))
    assert m["like"].oracle_auc is None and m["like"].oracle_ne is None  # NaN truth
    assert m["like"].oracle_fraction is None
    assert all(t.oracle_auc is None and t.oracle_ne is None for t in without.compute().values())
    # one unknown row among the kept ones: the oracle would score a different set of rows
    true_probs[mask.nonzero()[0], 0] = math.nan
    partial = MetricAccumulator(TASKS)
    partial.update(logits, labels, mask, true_probs)
    assert partial.compute()["click"].oracle_auc is None


def test_empty_and_single_class_are_undefined_not_errors():
    acc = MetricAccumulator(TASKS)
    empty = acc.compute()["click"]
    assert empty.count == 0 and math.isnan(empty.auc) and math.isnan(empty.ne)
    acc.update(torch.zeros(3, 2), torch.zeros(3, 2))
    m = acc.compute()["click"]
    assert math.isnan(m.auc) and math.isnan(m.ne) and math.isnan(m.calibration)
    json.dumps(m.to_dict(), allow_nan=False)  # NaN becomes null
    assert "-" in format_table({"click": m}).splitlines()[2]


def test_bad_input_raises():
    acc = MetricAccumulator(TASKS)
    with pytest.raises(ValueError, match=r"\(n, 2\), got \(4, 3\)"):
        acc.update(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mask must be"):
        acc.update(torch.zeros(4, 2), torch.zeros(4, 2), mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 or 1"):
        acc.update(torch.zeros(4, 2), torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="4 predicted probabilities are NaN"):
        acc.update(torch.full((4, 2), math.nan).index_fill(1, torch.tensor([1]), 0.0), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="outside"):
        MetricAccumulator(TASKS, from_logits=False).update(torch.full((4, 2), 1.5), torch.zeros(4, 2))
    assert acc.compute()["click"].count == 0  # nothing was kept from the rejected batches


def test_update_copies_the_caller_buffers():
    probs, labels = torch.full((4, 2), 0.25, dtype=torch.float64), torch.ones(4, 2, dtype=torch.bool)
    acc = MetricAccumulator(TASKS, from_logits=False)
    acc.update(probs, labels)
    probs.fill_(0.5)  # e.g. a reused output buffer
    labels.fill_(False)
    assert acc.compute()["click"].mean_pred == 0.25 and acc.compute()["click"].positives == 4


def test_format_table():
    acc = MetricAccumulator(TASKS)
    acc.update(*random_shard(seed=4, n=1000))
    lines = format_table(acc.compute()).splitlines()
    assert lines[0].split()[:4] == ["task", "count", "base", "rate"]
    assert len({len(line) for line in lines}) == 1  # fixed width
    click, like = lines[2].split(), lines[3].split()
    assert click[0] == "click" and "-" not in (click[4], click[5], click[7])  # oracle AUC, fraction, NE
    assert like[0] == "like" and (like[4], like[5], like[7]) == ("-", "-", "-")
    assert float(click[5]) == pytest.approx(acc.compute()["click"].oracle_fraction, abs=5e-4)


def test_all_gather_without_distributed_is_identity():
    acc = MetricAccumulator(TASKS)
    assert acc.all_gather() is acc


# (seed, rows) per rank and per update: unequal sizes; then rank 1 adds no rows; then neither does.
SHARDS = [
    [[(10, 37)], [(11, 64), (12, 5)]],
    [[(20, 50)], []],
    [[], []],
]


def single_process_metrics(shards) -> dict:
    acc = MetricAccumulator(TASKS)
    for rank_shards in shards:
        for seed, n in rank_shards:
            acc.update(*random_shard(seed, n))
    return {k: m.to_dict() for k, m in acc.compute().items()}


def gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = []
        for shards in SHARDS:
            acc = MetricAccumulator(TASKS)
            for seed, n in shards[rank]:
                acc.update(*random_shard(seed, n))
            results.append({k: m.to_dict() for k, m in acc.all_gather().compute().items()})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_all_gather_equals_single_process(tmp_path):
    mp.spawn(gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    expected = [single_process_metrics(shards) for shards in SHARDS]
    # JSON round-trips floats exactly, so equality here is bit-for-bit.
    expected = json.loads(json.dumps(expected))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
    assert expected[0]["click"]["oracle_auc"] is not None and expected[0]["like"]["oracle_auc"] is None
