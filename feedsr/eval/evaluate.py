"""Scoring a split: every target impression, no negative sampling. Serves validation and the script."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from feedsr.data.batch import Batch
from feedsr.eval.metrics import MetricAccumulator, TaskMetrics


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    task_names: list[str],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> MetricAccumulator:
    """Every target impression's predictions and labels of ``batches``, gathered over all ranks.

    A collective when torch.distributed is initialized: every rank must call it with the same
    number of batches (the reader guarantees it). The model is left in eval mode.
    """
    model.eval()
    accumulator = MetricAccumulator(task_names)
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch)
        accumulator.update(logits.float(), batch.labels, batch.target_mask, batch.true_probs,
                           batch.index_in_row())
    return accumulator.all_gather()


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    task_names: list[str],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, TaskMetrics]:
    """Per-task metrics over the target impressions of ``batches``, reduced over all ranks (see
    ``predict``)."""
    return predict(model, batches, task_names, device, autocast_dtype).compute()
