"""Shared test helpers: small real Parquet files in the feedsr schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from feedsr.data.reader import ReadSpec
from feedsr.data.schema import write_sequences

ACTIONS = ["click", "like", "share"]
SPEC = ReadSpec(action_names=tuple(ACTIONS), categorical=("surface",), context=("age",))


def random_rows(num_rows: int, seed: int, first_member: int = 0, max_len: int = 12) -> pa.Table:
    """Sequence rows with random lengths and values; member_id is unique and increasing."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, num_rows)
    n = int(lengths.sum())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    lst = lambda values: pa.ListArray.from_arrays(offsets, pa.array(values))  # noqa: E731
    ts = np.concatenate([np.sort(rng.integers(0, 10_000, k)) for k in lengths])
    return pa.table({
        "member_id": pa.array(np.arange(first_member, first_member + num_rows)),
        "item_ids": lst(rng.integers(0, 1000, n)),
        "author_ids": lst(rng.integers(0, 100, n)),
        "timestamps": lst(ts),
        "positions": lst(rng.integers(-1, 20, n)),
        "action_bits": lst(rng.integers(0, 1 << len(ACTIONS), n)),
        "num_targets": pa.array([int(rng.integers(1, k + 1)) for k in lengths]),
        "cat_surface": lst(rng.integers(0, 3, n)),
        "ctx_age": lst(rng.random(n).astype(np.float32)),
    })


def write_files(directory: Path, rows_per_file: list[int], row_group_sizes: list[int]) -> Path:
    """Files of the given row counts and row-group sizes (uneven on purpose); returns the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    member = 0
    for i, (rows, rg) in enumerate(zip(rows_per_file, row_group_sizes)):
        table = random_rows(rows, seed=i, first_member=member)
        write_sequences(table, directory / f"part-{i:05d}.parquet", ACTIONS, row_group_size=rg)
        member += rows
    return directory


@pytest.fixture
def uneven_split(tmp_path) -> Path:
    """A split of 4 files, 203 rows, row groups of 7..50 rows."""
    return write_files(tmp_path / "train", [50, 61, 3, 89], [7, 20, 3, 50])
