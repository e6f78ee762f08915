"""Loss weights equal their formulas on hand-built cases; non-targets weigh nothing."""

from __future__ import annotations

import math

import numpy as np
import torch

from conftest import make_batch, make_block
from feedsr.data.batch import collate
from conftest import MODEL_SPEC
from feedsr.train.loss import (
    LossConfig,
    MultiTaskLoss,
    estimate_propensities,
    ipw_weights,
    position_decay,
    position_weights,
    temporal_decay,
)


def test_position_decay_formula():
    w = position_decay(torch.tensor([3, 1, 5]))
    expected = [0.5, 0.5 ** 0.5, 1.0, 1.0, 0.5, 0.5 ** 0.75, 0.5 ** 0.5, 0.5 ** 0.25, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected))


def test_temporal_decay_formula_clamp_and_normalisation():
    day = 86_400
    ts = torch.tensor([0, 60 * day, 120 * day, 120 * day - 30 * day, 10_000 * day])
    mask = torch.tensor([True, True, True, False, True])
    w = temporal_decay(ts, torch.tensor([5]), mask, 60.0, 1e-4)
    newest = 10_000 * day
    raw = torch.tensor([max(0.5 ** ((newest - t) / day / 60), 1e-4) for t in ts.tolist()])
    torch.testing.assert_close(w, (raw / raw[mask].mean()).float())
    assert raw[0] == 1e-4 and raw[-1] == 1.0
    torch.testing.assert_close(w[mask].mean(), torch.tensor(1.0))


def test_ipw_weights_clip_and_unknown():
    props = torch.tensor([1.0, 0.5, 0.25, 0.05])
    w = ipw_weights(torch.tensor([0, 1, 2, 3, 9, -1]), props, min_propensity=0.1)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 4.0, 10.0, 10.0, 1.0]))


def test_weights_are_the_product_and_zero_off_target():
    block = make_block([4, 2], seed=0)
    block.rows["num_targets"] = np.array([2, 2])
    block.values["positions"] = np.array([0, 1, 2, -1, 1, 3])
    batch = collate(block, MODEL_SPEC)
    cfg = LossConfig()
    props = torch.tensor([1.0, 0.5, 0.2, 0.1])
    w = position_weights(batch, cfg, props)
    expected = (
        batch.target_mask.float()
        * ipw_weights(batch.positions, props, 0.1)
        * position_decay(batch.lengths)
        * temporal_decay(batch.timestamps, batch.lengths, batch.target_mask, 60.0, 1e-4)
    )
    torch.testing.assert_close(w, expected)
    assert (w[:2] == 0).all() and (w[2:] > 0).all()
    off = position_weights(batch, LossConfig(ipw=False, position_decay=False, temporal_decay=False), props)
    torch.testing.assert_close(off, batch.target_mask.float())


def test_loss_value_by_hand():
    batch = make_batch([3, 2], seed=1)
    batch.target_mask[:] = torch.tensor([False, True, True, True, True])
    logits = torch.randn(5, 3)
    loss_fn = MultiTaskLoss(LossConfig(ipw=False, temporal_decay=False), [1.0, 2.0, 0.5], None)
    out = loss_fn(logits, batch)
    p = torch.sigmoid(logits.double())
    y = batch.labels.double()
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    wpos = torch.tensor([0.5, 0.5 ** 0.5, 1.0, 0.5, 1.0], dtype=torch.float64)
    mask = batch.target_mask.double()
    expected = (mask[:, None] * wpos[:, None] * bce * torch.tensor([1.0, 2.0, 0.5])).sum() / 4
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)
    assert out.num_targets == 4


def test_estimated_propensities_recover_position_bias():
    rng = np.random.default_rng(0)
    n = 200_000
    exposure = np.array([1.0, 0.7, 0.5, 0.35])
    pos = rng.integers(0, 4, n)
    clicks = rng.random(n) < 0.3 * exposure[pos]
    block = make_block([n], seed=0)
    block.values["positions"], block.values["action_bits"] = pos, clicks.astype(np.int64)
    est = estimate_propensities([block], task_bitmask=1, num_positions=4, min_propensity=0.1)
    np.testing.assert_allclose(est, exposure, atol=0.02)
