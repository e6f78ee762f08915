"""The weighted multi-task loss: BCE at every target position, times a per-position weight.

weight = IPW(feed position) * position decay(index in sequence) * temporal decay(age), each
switchable; non-target positions weigh 0 (padding never reaches the loss: batches are jagged).

- IPW: 1 / propensity of the feed position, propensities given or estimated from the training data
  (click-rate ratio to position 0 of a reference task), clipped to ``[ipw_min_propensity, 1]``.
  Unknown positions (-1) and positions beyond the table weigh 1 and the last entry respectively.
- Position decay: 0.5 ** ((L - 1 - i) / (L - 1)) for impression i of a row of length L: the
  oldest weighs 0.5, the newest 1.0 (half-life = sequence length).
- Temporal decay: 0.5 ** (age / half_life) with age measured from the batch's newest impression,
  clamped to [1e-4, 1], then divided by its mean over the batch's targets (keeps gradient scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from feedsr.data.batch import Batch
from feedsr.runtime.config import LossConfig

SECONDS_PER_DAY = 86_400.0


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: what is minimised
    per_task: torch.Tensor  # (K,) unweighted mean BCE per task over targets (for logging)
    num_targets: int


def ipw_weights(positions: torch.Tensor, propensities: torch.Tensor, min_propensity: float) -> torch.Tensor:
    """(N,) feed positions -> (N,) inverse propensity weights; unknown positions weigh 1."""
    table = 1.0 / propensities.clamp(min=min_propensity, max=1.0)
    idx = positions.clamp(min=0, max=len(propensities) - 1)
    return torch.where(positions >= 0, table[idx], torch.ones_like(table[idx]))


def position_decay(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) row lengths -> (N,) weights 0.5 ** ((L-1-i)/(L-1)): oldest 0.5, newest 1.0."""
    length = torch.repeat_interleave(lengths, lengths).double()  # (N,)
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    index = torch.arange(len(length), device=lengths.device) - starts
    distance = (length - 1 - index) / (length - 1).clamp(min=1)
    return torch.pow(0.5, distance).float()


def temporal_decay(
    timestamps: torch.Tensor, lengths: torch.Tensor, target_mask: torch.Tensor,
    half_life_days: float, min_weight: float,
) -> torch.Tensor:
    """(N,) weights 0.5 ** (age / half-life), clamped, divided by their mean over targets."""
    age_days = (timestamps.max() - timestamps).double() / SECONDS_PER_DAY
    weight = torch.pow(0.5, age_days / half_life_days).clamp(min_weight, 1.0)
    return (weight / weight[target_mask].mean()).float()


def position_weights(batch: Batch, cfg: LossConfig, propensities: torch.Tensor | None) -> torch.Tensor:
    """(N,) the product of the enabled weights, 0 at non-target positions."""
    weight = batch.target_mask.float()
    if cfg.ipw and propensities is not None:
        weight = weight * ipw_weights(batch.positions, propensities, cfg.ipw_min_propensity)
    if cfg.position_decay:
        weight = weight * position_decay(batch.lengths)
    if cfg.temporal_decay and batch.target_mask.any():
        weight = weight * temporal_decay(batch.timestamps, batch.lengths, batch.target_mask,
                                         cfg.temporal_half_life_days, cfg.temporal_min_weight)
    return weight


class MultiTaskLoss(torch.nn.Module):
    """Args:
        cfg: loss config.
        task_weights: (K,) per-task weights.
        propensities: (P,) per feed position, or None (no IPW).
    """

    def __init__(self, cfg: LossConfig, task_weights: list[float], propensities: list[float] | None):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("task_weights", torch.tensor(task_weights, dtype=torch.float32))
        self.register_buffer(
            "propensities", None if propensities is None else torch.tensor(propensities, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, batch: Batch) -> LossOutput:
        weight = position_weights(batch, self.cfg, self.propensities)  # (N,)
        labels = batch.labels
        if self.cfg.label_smoothing:
            labels = labels * (1 - 2 * self.cfg.label_smoothing) + self.cfg.label_smoothing
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")  # (N, K)
        count = batch.target_mask.sum()
        denom = count.clamp(min=1)
        loss = (weight[:, None] * bce * self.task_weights).sum() / denom
        per_task = (bce * batch.target_mask[:, None]).sum(0).detach() / denom
        return LossOutput(loss, per_task, int(count))


def estimate_propensities(
    blocks, task_bitmask: int, num_positions: int, min_propensity: float
) -> list[float]:
    """Propensity per feed position: positive rate at p over positive rate at 0, at targets.

    Valid when what is shown does not depend on the position (the standard click-rate-ratio
    estimate); positions past the table share the last entry. Positions never seen get 1 (no
    reweighting) rather than a guess.
    """
    shown = np.zeros(num_positions)
    positive = np.zeros(num_positions)
    for block in blocks:
        target = block.target_flags()
        pos = block.values["positions"][target]
        hit = (block.values["action_bits"][target] & task_bitmask) != 0
        known = pos >= 0
        idx = np.minimum(pos[known], num_positions - 1)
        shown += np.bincount(idx, minlength=num_positions)
        positive += np.bincount(idx, weights=hit[known], minlength=num_positions)
    if shown[0] == 0 or positive[0] == 0:
        return [1.0] * num_positions
    rate = np.divide(positive, shown, out=np.full(num_positions, np.nan), where=shown > 0)
    ratio = np.clip(rate / rate[0], min_propensity, 1.0)
    return [float(r) if np.isfinite(r) else 1.0 for r in ratio]
