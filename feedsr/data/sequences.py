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
from feedsr.data.schema import PER_IMPRESSION_COLUMNS, DataError, column_kind, write_sequences

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


def split_rows(log: dict[str, np.ndarray], split: Split, max_seq_len: int) -> tuple[np.ndarray, ...]:
    """The split's rows over ``log`` (flat arrays sorted by (member_id, timestamp)): (row_start,
    row_end, num_targets), in member order, each member's oldest window first."""
    member, ts = log["member_id"], log["timestamps"]
    bounds = np.flatnonzero(np.diff(member)) + 1
    m_starts = np.concatenate([[0], bounds]).astype(np.int64)
    # Per member: index of the first impression at/after split.start and at/after split.end
    # (the log is time-sorted within each member, so counting what lies before is enough).
    first_target = m_starts + np.add.reduceat((ts < split.start).astype(np.int64), m_starts)
    hist_end = m_starts + np.add.reduceat((ts < split.end).astype(np.int64), m_starts)
    starts, ends, targets = split_windows(m_starts, first_target, hist_end, max_seq_len)
    order = np.argsort(starts, kind="stable")
    return starts[order], ends[order], targets[order]


class SplitWriter:
    """Writes one split's rows under ``out_dir/<split.name>/`` from a log that comes in chunks of
    whole members, in member order (a log too big for memory). Files hold ``rows_per_file`` rows
    each but the last, as if the log came at once: rows that do not fill a file wait for the next
    chunk. ``close`` writes the rest and returns the split's counts."""

    def __init__(self, out_dir: Path, split: Split, action_names: list[str], max_seq_len: int,
                 rows_per_file: int = 8192, row_group_size: int = 512):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.split, self.action_names, self.max_seq_len = split, action_names, max_seq_len
        self.rows_per_file, self.row_group_size = rows_per_file, row_group_size
        # dataset.json marks a complete dataset: drop a stale one before rewriting any split.
        (out_dir / DATASET_META).unlink(missing_ok=True)
        self.dir = out_dir / split.name
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("part-*.parquet*"):  # .tmp leftovers of a crashed write too
            old.unlink()
        self.files = 0
        self.waiting: pa.Table | None = None  # fewer than rows_per_file rows, for the next file
        self.counts = {"rows": 0, "members": 0, "targets": 0, "impressions": 0}

    def add(self, log: dict[str, np.ndarray]) -> None:
        """Window a chunk of the log (whole members, after those of earlier chunks) and write it."""
        if len(log["member_id"]) == 0:
            raise ValueError(f"split '{self.split.name}': the impression log is empty")
        starts, ends, targets = split_rows(log, self.split, self.max_seq_len)
        self.counts["rows"] += len(starts)
        self.counts["members"] += len(np.unique(log["member_id"][starts]))
        self.counts["targets"] += int(targets.sum())
        self.counts["impressions"] += int((ends - starts).sum())
        waiting = 0 if self.waiting is None else self.waiting.num_rows
        cuts = [0, *range(self.rows_per_file - waiting, len(starts), self.rows_per_file), len(starts)]
        for lo, hi in zip(cuts, cuts[1:]):
            if hi > lo:
                self._file_or_wait(rows_table(log, starts[lo:hi], ends[lo:hi], targets[lo:hi]))

    def _file_or_wait(self, table: pa.Table) -> None:
        if self.waiting is not None:
            table, self.waiting = pa.concat_tables([self.waiting, table]), None
        if table.num_rows < self.rows_per_file:
            self.waiting = table
        else:
            self._write(table)

    def _write(self, table: pa.Table) -> None:
        path = self.dir / f"part-{self.files:05d}.parquet"
        write_sequences(table, path, self.action_names, self.row_group_size)
        self.files += 1

    def close(self) -> dict:
        if self.waiting is not None:
            self._write(self.waiting)
            self.waiting = None
        return self.counts | {"start": int(self.split.start), "end": int(self.split.end)}


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
    writer = SplitWriter(out_dir, split, action_names, max_seq_len, rows_per_file, row_group_size)
    writer.add(log)
    return writer.close()


def write_dataset_meta(out_dir: Path, meta: dict) -> None:
    """Write ``dataset.json`` last, so its presence marks a complete dataset."""
    tmp = out_dir / (DATASET_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / DATASET_META)


def read_dataset_meta(data_dir: str | Path) -> dict | None:
    """The dataset's dataset.json, None if there is none; DataError naming it if unreadable."""
    path = Path(data_dir) / DATASET_META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-make the dataset or fix the file") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


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
