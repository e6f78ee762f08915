"""Moments of a split's context features, for the models' input standardisation."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from feedsr.data.block import SequenceBlock
from feedsr.data.schema import CONTEXT_PREFIX


def context_moments(blocks: Iterable[SequenceBlock], context: list[str],
                    max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C,) mean and (C,) population standard deviation of each context feature over every
    impression of the blocks' rows (the first ``max_rows`` rows when given: enough for moments,
    and a bounded read on a large split). Zeros and ones when there is nothing to count."""
    count, total, squares, rows = 0, np.zeros(len(context)), np.zeros(len(context)), 0
    for block in blocks:
        if max_rows is not None and rows >= max_rows:
            break
        values = np.stack([block.values[CONTEXT_PREFIX + c] for c in context], axis=1).astype(np.float64)
        count, rows = count + len(values), rows + len(block)
        total += values.sum(0)
        squares += np.square(values).sum(0)
    if count == 0:
        return np.zeros(len(context)), np.ones(len(context))
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
