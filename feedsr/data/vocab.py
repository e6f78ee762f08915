"""Dense id vocabularies and the embedding table sizes they imply.

The model takes every id modulo its table size. Raw ids are not made for that: KuaiRand author ids
reach 8,733,984, so modulo a table of 8,192 rows its 6,510 authors shared 4,519 rows. A dense
vocabulary maps the V distinct values a dataset knows to ids 1..V (in ascending raw order, so the
mapping depends only on the set of values), and a table of V + 1 rows then gives each its own row.

Id 0 (``UNKNOWN_ID``) is reserved for values the vocabulary does not hold: nulls, and values the
converter chose to leave out (KuaiRand builds each vocabulary from the training window only, so
an id first seen in validation shares the unknown row instead of an untrained one of its own).

Each dataset records the rows every table needs in dataset.json under ``VOCAB_SIZES``, keyed by
column name (``item_ids``, ``author_ids``, ``cat_<name>``); ``table_sizes`` resolves a data
config's sizes against it, and ``collision_rate`` says what a smaller table costs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from feedsr.data.sequences import DATASET_META

UNKNOWN_ID = 0
VOCAB_SIZES = "vocab_sizes"  # dataset.json key: column -> table rows needed, unknown row included
VOCAB_FILE = "vocab.json"  # column -> raw values in id order (the value at index i has id i + 1)


def build_vocab(values: np.ndarray) -> np.ndarray:
    """The vocabulary of ``values``: their distinct values in ascending order.

    The value at index i gets id i + 1. Callers pass only the values that should get an id
    (e.g. no nulls, only the training window).
    """
    return np.unique(values)


def apply_vocab(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(n,) int64 ids: 1 + each value's index in ``vocab``, ``UNKNOWN_ID`` where it is absent."""
    if len(vocab) == 0:
        return np.full(len(values), UNKNOWN_ID, dtype=np.int64)
    index = np.searchsorted(vocab, values).clip(max=len(vocab) - 1)
    return np.where(vocab[index] == values, index + 1, UNKNOWN_ID).astype(np.int64)


def vocab_size(vocab: np.ndarray | list) -> int:
    """Rows a table needs for the ids of ``apply_vocab(vocab, ...)``: one a value, plus unknown."""
    return len(vocab) + 1


def write_vocabs(out_dir: Path, vocabs: dict[str, list]) -> None:
    """``out_dir/vocab.json``: per column, the raw values in id order, to encode new data alike."""
    (out_dir / VOCAB_FILE).write_text(json.dumps(vocabs, sort_keys=True) + "\n")


def read_vocabs(data_dir: str | Path) -> dict[str, list]:
    return json.loads((Path(data_dir) / VOCAB_FILE).read_text())


def table_sizes(configured: dict[str, int | None], meta: dict) -> dict[str, int]:
    """Table rows per id feature: a configured int as given, None for the dataset's vocabulary size.

    Args:
        configured: column (``item_ids``, ``author_ids``, ``cat_<name>``) -> rows or None.
        meta: the dataset's dataset.json.

    Raises ValueError naming the feature when a size is None and dataset.json records no
    vocabulary for it, or when a configured size is not a positive int.
    """
    recorded = meta.get(VOCAB_SIZES, {})
    sizes = {}
    for feature, size in configured.items():
        if size is None:
            if feature not in recorded:
                raise ValueError(
                    f"'{feature}': table size null means the dataset's vocabulary size, but the "
                    f"{DATASET_META} of dataset '{meta.get('source', '?')}' records none "
                    f"({VOCAB_SIZES}: {sorted(recorded)}); re-make the dataset or configure a size"
                )
            size = recorded[feature]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"'{feature}': table size must be an int >= 1 or null, got {size!r}")
        sizes[feature] = size
    return sizes


def collision_rate(vocab_size: int, table_size: int) -> float:
    """Share of the ids 0..vocab_size-1 that share their row with another id, modulo table_size."""
    if vocab_size < 1 or table_size < 1:
        raise ValueError(
            f"sizes must be >= 1, got vocab_size={vocab_size}, table_size={table_size}")
    # `fuller` rows hold per_row + 1 ids each, the other rows per_row.
    per_row, fuller = divmod(vocab_size, table_size)
    shared = fuller * (per_row + 1) if per_row >= 1 else 0
    if per_row >= 2:
        shared += (table_size - fuller) * per_row
    return shared / vocab_size
