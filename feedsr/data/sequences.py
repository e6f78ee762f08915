"""Impression log -> Parquet sequence rows with a temporal split.

Both the synthetic generator and the KuaiRand converter end here, so that splitting, windowing and
the on-disk layout exist once:

    DIR/dataset.json            what the dataset holds (actions, features, counts, provenance)
    DIR/<split>/part-NNNNN.parquet

A split is the impressions with ``start <= timestamp < end``. Each split's rows hold each member's
full history up to the split's end, with ``num_targets`` = the member's impressions inside the split.
A member with more than ``max_seq_len`` impressions gets several rows (windows): targets are cut
into chunks of at most ``max_seq_len`` from the newest backwards, and each row is the
``max_seq_len`` impressions ending at its chunk's last target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from feedsr.data.block import ranges
from feedsr.data.schema import PER_IMPRESSION_COLUMNS, column_kind, write_sequences

DATASET_META = "dataset.json"


@dataclass(frozen=True)
class Split:
    name: str
    start: int  # seconds, inclusive
    end: int  # seconds, exclusive


def split_windows(
    member_starts: np.ndarray,
    first_target: np.ndarray,
    end: np.ndarray,
    max_seq_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows for one split: (row_start, row_end, num_targets), indices into the flat log.

    Per member, impressions [member_start, end) are history+targets and [first_target, end) the
    targets. Members without targets get no row.
    """
    starts, ends, targets = [], [], []
    for m_start, t_first, m_end in zip(member_starts, first_target, end):
        chunk_end = m_end
        while chunk_end > t_first:  # newest chunk first, then older ones
            chunk_start = max(t_first, chunk_end - max_seq_len)
            starts.append(max(m_start, chunk_end - max_seq_len))
            ends.append(chunk_end)
            targets.append(chunk_end - chunk_start)
            chunk_end = chunk_start
    as_array = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return as_array(starts), as_array(ends), as_array(targets)


def rows_table(log: dict[str, np.ndarray], starts, ends, num_targets) -> pa.Table:
    """Gather windows [start, end) of the flat log into a table of sequence rows."""
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int32)
    idx = ranges(starts, ends - starts)
    columns = {"member_id": pa.array(log["member_id"][starts], pa.int64())}
    for name, values in log.items():
        if name == "member_id":
            continue
        if column_kind(name) is None or not column_kind(name)[1]:
            raise ValueError(f"log column '{name}' is not a per-impression feedsr column")
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[idx]))
    columns["num_targets"] = pa.array(num_targets, pa.int64())
    return pa.table(columns)


def write_split(
    out_dir: Path,
    log: dict[str, np.ndarray],
    split: Split,
    action_names: list[str],
    max_seq_len: int,
    rows_per_file: int = 8192,
    row_group_size: int = 512,
) -> dict:
    """Write one split's rows under ``out_dir/<split.name>/``; return its counts.

    ``log`` holds flat per-impression arrays sorted by (member_id, timestamp), including
    ``member_id`` and ``timestamps``.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if len(log["member_id"]) == 0:
        raise ValueError(f"split '{split.name}': the impression log is empty")
    # dataset.json marks a complete dataset: drop a stale one before rewriting any split.
    (out_dir / DATASET_META).unlink(missing_ok=True)
    member, ts = log["member_id"], log["timestamps"]
    bounds = np.flatnonzero(np.diff(member)) + 1
    m_starts = np.concatenate([[0], bounds]).astype(np.int64)
    # Per member: index of the first impression at/after split.start and at/after split.end
    # (the log is time-sorted within each member, so counting what lies before is enough).
    first_target = m_starts + np.add.reduceat((ts < split.start).astype(np.int64), m_starts)
    hist_end = m_starts + np.add.reduceat((ts < split.end).astype(np.int64), m_starts)
    starts, ends, targets = split_windows(m_starts, first_target, hist_end, max_seq_len)
    split_dir = out_dir / split.name
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("part-*.parquet*"):  # .tmp leftovers of a crashed write too
        old.unlink()
    order = np.argsort(starts, kind="stable")  # member order, oldest window first
    starts, ends, targets = starts[order], ends[order], targets[order]
    for f, lo in enumerate(range(0, len(starts), rows_per_file)):
        hi = lo + rows_per_file
        table = rows_table(log, starts[lo:hi], ends[lo:hi], targets[lo:hi])
        write_sequences(table, split_dir / f"part-{f:05d}.parquet", action_names, row_group_size)
    return {
        "rows": int(len(starts)),
        "members": int(len(np.unique(member[starts]))) if len(starts) else 0,
        "targets": int(targets.sum()),
        "impressions": int((ends - starts).sum()),
        "start": int(split.start),
        "end": int(split.end),
    }


def write_dataset_meta(out_dir: Path, meta: dict) -> None:
    """Write ``dataset.json`` last, so its presence marks a complete dataset."""
    tmp = out_dir / (DATASET_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / DATASET_META)


def read_dataset_meta(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / DATASET_META
    return json.loads(path.read_text()) if path.exists() else None


def check_log(log: dict[str, np.ndarray]) -> None:
    """Check a flat log before anything is written; ValueError naming the bad column."""
    n = len(log.get("member_id", ()))
    for name in ("member_id",) + PER_IMPRESSION_COLUMNS:
        if name not in log:
            raise ValueError(f"log lacks column '{name}'")
    for name, values in log.items():
        kind = column_kind(name)
        if name != "member_id" and (kind is None or not kind[1]):
            raise ValueError(f"log column '{name}' is not a per-impression feedsr column")
        if len(values) != n:
            raise ValueError(f"log column '{name}' has {len(values)} values, expected {n}")
    member, ts = log["member_id"], log["timestamps"]
    same_member = np.diff(member) == 0
    if not np.all((np.diff(member) > 0) | (same_member & (np.diff(ts) >= 0))):
        raise ValueError("log must be sorted by (member_id, timestamps)")
