"""Moments and quantiles of a split's numeric features (``ctx_*``, ``dense_*``), for the models'
input standardisation and quantile bins."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from feedsr.data.block import SequenceBlock


def column_moments(blocks: Iterable[SequenceBlock], columns: list[str],
                   max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C,) mean and (C,) population standard deviation of each numeric column over every
    impression of the blocks' rows (the first ``max_rows`` rows when given: enough for moments,
    and a bounded read on a large split). Zeros and ones when there is nothing to count."""
    count, total, squares, rows = 0, np.zeros(len(columns)), np.zeros(len(columns)), 0
    for block in blocks:
        if max_rows is not None and rows >= max_rows:
            break
        values = np.stack([block.values[c] for c in columns], axis=1).astype(np.float64)
        count, rows = count + len(values), rows + len(block)
        total += values.sum(0)
        squares += np.square(values).sum(0)
    if count == 0:
        return np.zeros(len(columns)), np.ones(len(columns))
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))


def column_quantiles(blocks: Iterable[SequenceBlock], columns: list[str], quantiles: np.ndarray,
                     max_values: int) -> np.ndarray:
    """(Q, C) quantiles of each numeric column over the impressions of the blocks' first rows, up
    to ``max_values`` impressions (every impression of a row, history and targets alike, as for
    the moments), kept in float32: 300k x 100 columns is 120 MB, plus one block being read.
    Zeros when there is nothing to count."""
    parts, count = [], 0
    for block in blocks:
        if count >= max_values:
            break
        values = np.stack([block.values[c] for c in columns], axis=1).astype(np.float32)[:max_values - count]
        parts.append(values)
        count += len(values)
    if count == 0:
        return np.zeros((len(quantiles), len(columns)))
    return np.quantile(np.concatenate(parts), quantiles, axis=0)
