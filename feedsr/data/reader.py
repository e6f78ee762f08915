"""Streaming reader: Parquet row groups -> shuffled, rank- and worker-partitioned row blocks.

How an epoch is cut (all of it is arithmetic on row-group sizes from the files' footers, so every
rank and worker computes the same plan without talking to the others):

0. With ``head_rows`` = H, the split's first H rows in file / row-group order are set aside: a
   reader skips them (training around HDET's held-out clean batch), or with ``only_head`` reads
   them alone (that clean batch; a validation cap that is the same rows for any world size).
   Either way the rows it reads are cut as below.
1. The row groups of all files ("units") are put in an order: shuffled by (seed, epoch) for
   training, file/row-group order otherwise. Concatenated, they form one global row sequence.
2. Rank r takes the contiguous rows [r*N/W, (r+1)*N/W): no overlap, no gap.
3. Every rank yields the same number of batches K (HDET's collectives and DDP need it): K is the
   largest rank's ceil(rows / batch_size); a rank one row short splits one batch in two.
   ``drop_last`` instead gives every rank K = floor(min rows / batch_size) full batches.
4. Loader worker w of a rank yields that rank's batches k = w, w + num_workers, ...; it reads the
   contiguous slice of the rank's rows that those batches need. PyTorch's DataLoader takes one
   batch from each worker in turn, so the rank sees batches 0, 1, 2, ... in order.
5. Inside a worker, rows pass a shuffle buffer (seeded by seed, epoch, rank, worker), are cut into
   that worker's batch sizes, optionally shuffled within sessions, and collated.

Resuming at batch n of an epoch replays the plan and drops the first n batches before collation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from feedsr.data.block import DEFAULT_SESSION_GAP_S, SequenceBlock, session_shuffle
from feedsr.data.schema import (
    CATEGORICAL_PREFIX,
    CONTEXT_PREFIX,
    DENSE_PREFIX,
    FLOAT_PREFIXES,
    ID_COLUMNS,
    PER_IMPRESSION_COLUMNS,
    TRUE_PROB_PREFIX,
    UNKNOWN_POSITION,
    DataError,
    check_schema,
    file_action_names,
)


@dataclass(frozen=True)
class ReadSpec:
    """What to read from each file, and the action names the files must carry."""

    action_names: tuple[str, ...]
    categorical: tuple[str, ...] = ()  # names without the cat_ prefix
    context: tuple[str, ...] = ()  # names without the ctx_ prefix
    true_probs: tuple[str, ...] = ()  # action names with a true_ column (synthetic data)
    dense: tuple[str, ...] = ()  # names without the dense_ prefix (numbers in the post token)

    @property
    def list_columns(self) -> list[str]:
        return (
            list(PER_IMPRESSION_COLUMNS)
            + [CATEGORICAL_PREFIX + c for c in self.categorical]
            + [DENSE_PREFIX + c for c in self.dense]
            + [CONTEXT_PREFIX + c for c in self.context]
            + [TRUE_PROB_PREFIX + a for a in self.true_probs]
        )

    @property
    def columns(self) -> list[str]:
        return ["member_id", "num_targets"] + self.list_columns


@dataclass(frozen=True)
class FileInfo:
    path: str
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The Parquet files of one split, ``DIR/<split>/*.parquet``, in name order."""
    split_dir = Path(data_dir) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split directory does not exist")
    files = sorted(split_dir.glob("*.parquet"))
    if not files:
        raise DataError(f"{split_dir}: no *.parquet files")
    return files


def open_file(path: str | Path, spec: ReadSpec) -> FileInfo:
    """Open a file's footer and check it against the schema; DataError naming the path if not."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e
    schema = meta.schema.to_arrow_schema()
    check_schema(path, schema, spec.columns)
    names = file_action_names(schema)
    if names is None:  # written by another tool (Spark, DuckDB): nothing to check the bits against
        warnings.warn(f"{path}: no feedsr.action_names metadata; its action_bits are read as "
                      f"{list(spec.action_names)} (bit i = action i)", stacklevel=2)
    elif tuple(names) != spec.action_names:
        raise DataError(
            f"{path}: file's action names {names} differ from the config's {list(spec.action_names)}"
        )
    if meta.num_rows == 0:
        raise DataError(f"{path}: file has no rows")
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return FileInfo(str(path), rows)


def open_files(paths: list[str | Path], spec: ReadSpec) -> list[FileInfo]:
    return [open_file(p, spec) for p in paths]


# ---------------------------------------------------------------------------------------------
# Reading and validating one row group
# ---------------------------------------------------------------------------------------------


def _where(path: str, row_group: int, first_row: int, bad: np.ndarray) -> str:
    row = first_row + int(np.flatnonzero(bad)[0])
    return f"{path}: row group {row_group}, row {row} (of the file)"


def _flat(column: pa.ChunkedArray, path: str, rg: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, flat values) of a list column; DataError on nulls."""
    arr = column.combine_chunks()
    if arr.null_count or (arr.type.num_fields and arr.flatten().null_count):
        raise DataError(f"{path}: row group {rg}: column '{name}' contains nulls")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, arr.flatten().to_numpy(zero_copy_only=False)


def read_block(info: FileInfo, row_group: int, spec: ReadSpec) -> SequenceBlock:
    """Read and validate one row group into a SequenceBlock."""
    path = info.path
    try:
        table = pq.ParquetFile(path).read_row_group(row_group, columns=spec.columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: row group {row_group} cannot be read: {e}") from e
    return table_block(table, spec, path, row_group, sum(info.row_group_rows[:row_group]))


def table_block(table: pa.Table, spec: ReadSpec, path: str, row_group: int, first_row: int) -> SequenceBlock:
    """A validated SequenceBlock of an Arrow table of sequence rows (``spec.columns``); errors
    name ``path``, the row group and the row (``first_row``: the file row of the table's first)."""
    rows = {}
    for name in ("member_id", "num_targets"):
        col = table.column(name)
        if col.null_count:
            raise DataError(f"{path}: row group {row_group}: column '{name}' contains nulls")
        rows[name] = col.to_numpy().astype(np.int64)
    lengths, values = None, {}
    for name in spec.list_columns:
        col_lengths, flat = _flat(table.column(name), path, row_group, name)
        if lengths is None:
            lengths = col_lengths
        elif not np.array_equal(col_lengths, lengths):
            bad = col_lengths != lengths
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{_where(path, row_group, first_row, bad)}: column '{name}' has "
                f"{col_lengths[i]} values but '{spec.list_columns[0]}' has {lengths[i]}"
            )
        kind = np.float32 if name.startswith(FLOAT_PREFIXES) else np.int64
        values[name] = flat.astype(kind, copy=False)
    block = SequenceBlock(lengths=lengths, rows=rows, values=values)
    validate_block(block, spec, path, row_group, first_row)
    return block


def _row_of(block: SequenceBlock, bad_elems: np.ndarray) -> np.ndarray:
    """Per-row flag: does the row own any flagged impression?"""
    owner = np.repeat(np.arange(len(block)), block.lengths)
    return np.bincount(owner[bad_elems], minlength=len(block)) > 0


def validate_block(
    block: SequenceBlock, spec: ReadSpec, path: str, row_group: int, first_row: int
) -> None:
    """Value checks; each failure names the file, row group, row and column."""
    where = lambda bad: _where(path, row_group, first_row, bad)  # noqa: E731
    if (block.lengths == 0).any():
        raise DataError(f"{where(block.lengths == 0)}: empty sequence (no impressions)")
    nt = block.rows["num_targets"]
    bad = (nt < 1) | (nt > block.lengths)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where(bad)}: num_targets={nt[i]} outside [1, {block.lengths[i]}] (the row's length)"
        )
    if (block.rows["member_id"] < 0).any():
        raise DataError(f"{where(block.rows['member_id'] < 0)}: column 'member_id' has a negative id")
    v = block.values
    checks = [(f"column '{c}' has a negative id", v[c] < 0) for c in ID_COLUMNS]
    checks += [
        (f"column '{CATEGORICAL_PREFIX}{c}' has a negative value", v[CATEGORICAL_PREFIX + c] < 0)
        for c in spec.categorical
    ]
    checks.append((f"column 'positions' has a value below {UNKNOWN_POSITION}",
                   v["positions"] < UNKNOWN_POSITION))
    max_bits = 1 << len(spec.action_names)
    checks.append((f"column 'action_bits' has bits beyond the {len(spec.action_names)} actions "
                   f"{list(spec.action_names)}", (v["action_bits"] < 0) | (v["action_bits"] >= max_bits)))
    checks += [(f"column '{name}' has a non-finite value", ~np.isfinite(v[name]))
               for name in [DENSE_PREFIX + c for c in spec.dense] + [CONTEXT_PREFIX + c for c in spec.context]]
    checks += [(f"column '{TRUE_PROB_PREFIX}{a}' has a value outside [0, 1]",
                ~((v[TRUE_PROB_PREFIX + a] >= 0) & (v[TRUE_PROB_PREFIX + a] <= 1)))
               for a in spec.true_probs]
    checks.append(("column 'timestamps' decreases (impressions must be oldest first)",
                   block.time_goes_back()))
    checks.append(("column 'timestamps' is negative (seconds since 1970 expected; milliseconds or "
                   "a shifted clock?)", v["timestamps"] < 0))
    for message, bad_elems in checks:
        if bad_elems.any():
            raise DataError(f"{where(_row_of(block, bad_elems))}: {message}")


# ---------------------------------------------------------------------------------------------
# The epoch plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """Rows [first_row, first_row + num_rows) of one row group."""

    file: int
    row_group: int
    num_rows: int
    first_row: int = 0


def file_units(files: list[FileInfo]) -> list[Unit]:
    """Every row group, in file / row-group order."""
    return [Unit(f, g, n) for f, info in enumerate(files) for g, n in enumerate(info.row_group_rows)]


def split_head(units: list[Unit], head_rows: int) -> tuple[list[Unit], list[Unit]]:
    """(the first ``head_rows`` rows of ``units``, the others); a row group on the edge is cut."""
    held, rest, left = [], [], head_rows
    for u in units:
        take = min(left, u.num_rows)
        if take:
            held.append(Unit(u.file, u.row_group, take, u.first_row))
        if take < u.num_rows:
            rest.append(Unit(u.file, u.row_group, u.num_rows - take, u.first_row + take))
        left -= take
    return held, rest


def epoch_units(units: list[Unit], seed: int, epoch: int, shuffle: bool) -> list[Unit]:
    """The units in this epoch's order: shuffled by (seed, epoch), or as given."""
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        units = [units[i] for i in order]
    return units


def rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous global rows [lo, hi) of one rank."""
    return rank * total // world_size, (rank + 1) * total // world_size


def batch_sizes(num_rows: int, num_batches: int, batch_size: int) -> list[int]:
    """Cut ``num_rows`` into exactly ``num_batches`` non-empty batches of at most ``batch_size``."""
    full, rest = divmod(num_rows, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    sizes = sizes[:num_batches] if len(sizes) > num_batches else sizes
    while len(sizes) < num_batches:  # at most once or twice: ranks differ by one row
        big = int(np.argmax(sizes))
        if sizes[big] < 2:
            raise DataError(
                f"cannot cut {num_rows} rows into {num_batches} equal-count batches; "
                "use a larger batch size or data.drop_last=true"
            )
        half = sizes[big] // 2
        sizes[big : big + 1] = [sizes[big] - half, half]
    return sizes


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch."""

    row_lo: int
    row_hi: int
    sizes: tuple[int, ...]  # batch sizes, in batch order
    dropped_rows: int  # rows of this rank's range left out by drop_last


def rank_plan(total: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> RankPlan:
    if total < world_size:
        raise DataError(f"{total} rows cannot be split over {world_size} ranks")
    lo, hi = rank_rows(total, rank, world_size)
    smallest, largest = total // world_size, math.ceil(total / world_size)
    if drop_last:
        k = smallest // batch_size
        if k == 0:
            raise DataError(
                f"drop_last with batch size {batch_size} leaves no batch: "
                f"each of {world_size} ranks has only {smallest} rows"
            )
        return RankPlan(lo, lo + k * batch_size, (batch_size,) * k, hi - lo - k * batch_size)
    k = math.ceil(largest / batch_size)
    return RankPlan(lo, hi, tuple(batch_sizes(hi - lo, k, batch_size)), 0)


def worker_ranges(plan: RankPlan, num_workers: int) -> list[tuple[int, int, list[int]]]:
    """Per logical worker: (row_lo, row_hi, its batch sizes); batch k goes to worker k % n."""
    out, lo = [], plan.row_lo
    for w in range(num_workers):
        sizes = list(plan.sizes[w::num_workers])
        out.append((lo, lo + sum(sizes), sizes))
        lo += sum(sizes)
    return out


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class ReaderConfig:
    batch_size: int
    seed: int = 0
    shuffle: bool = False
    shuffle_buffer: int = 4096  # rows
    length_bucketing: bool = False  # batches of similar lengths (less padding): random order when
    # shuffling; without shuffle (evaluation), windows of shuffle_buffer rows sorted by length
    max_seq_len: int = 256
    session_shuffle: bool = False
    session_gap_s: int = DEFAULT_SESSION_GAP_S
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    head_rows: int = 0  # the split's first rows (file / row-group order): skipped...
    only_head: bool = False  # ...or, with only_head, the only rows read

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, world_size={self.world_size})")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.head_rows < 0:
            raise ValueError(f"head_rows must be >= 0, got {self.head_rows}")
        if self.only_head and self.head_rows < 1:
            raise ValueError(f"only_head=True needs head_rows >= 1, got {self.head_rows}")


class SequenceReader(IterableDataset):
    """Iterates one rank's batches of one epoch; ``collate`` turns a SequenceBlock into a batch.

    Args:
        files: opened files (``open_files``) of one split.
        spec: columns and action names.
        config: batch size, shuffling, rank/world size.
        collate: SequenceBlock -> whatever the model consumes (default: the block itself).

    Example::

        reader = SequenceReader(open_files(split_files(d, "train"), spec), spec,
                                ReaderConfig(batch_size=256, shuffle=True))
        reader.set_epoch(0)
        loader = DataLoader(reader, batch_size=None, num_workers=2)
    """

    def __init__(
        self,
        files: list[FileInfo],
        spec: ReadSpec,
        config: ReaderConfig,
        collate: Callable[[SequenceBlock], Any] | None = None,
    ):
        self.files, self.spec, self.config = files, spec, config
        self.collate = collate
        self.units = reader_units(files, config)
        self.total_rows = sum(u.num_rows for u in self.units)
        self.plan = rank_plan(
            self.total_rows, config.rank, config.world_size, config.batch_size, config.drop_last
        )
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return len(self.plan.sizes)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch, and how many of its batches to drop (for an exact resume)."""
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        num_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        # DataLoader worker j serves logical worker (j + skip) % n, so that after dropping the
        # first `skip` batches the round-robin still yields batches in order (see module doc).
        logical = (worker + self.skip) % num_workers
        yield from self._iter_worker(logical, num_workers)

    def _iter_worker(self, logical: int, num_workers: int) -> Iterator[Any]:
        cfg = self.config
        lo, hi, sizes = worker_ranges(self.plan, num_workers)[logical]
        rng = np.random.default_rng([cfg.seed, self.epoch, cfg.rank, logical])
        blocks = self._read_range(lo, hi)
        if cfg.shuffle and cfg.shuffle_buffer > 0:
            bucket = cfg.batch_size if cfg.length_bucketing else 0
            blocks = _shuffle_buffer(blocks, cfg.shuffle_buffer, rng, bucket)
        elif cfg.length_bucketing and cfg.shuffle_buffer > 0:
            blocks = _sorted_windows(blocks, cfg.shuffle_buffer)
        for i, block in enumerate(_cut(blocks, sizes)):
            index = logical + i * num_workers  # the batch's index in the rank's epoch
            if index < self.skip:
                continue  # resumed: already consumed; skip before the costly collation
            if cfg.session_shuffle:
                # Seeded by the batch index, not drawn from `rng`: skipped batches must not shift
                # the stream that later batches use, or a resumed epoch would differ.
                batch_rng = np.random.default_rng([cfg.seed, self.epoch, cfg.rank, index])
                block = session_shuffle(block, cfg.session_gap_s, batch_rng)
            yield self.collate(block) if self.collate else block

    def _read_range(self, lo: int, hi: int) -> Iterator[SequenceBlock]:
        """Blocks covering global rows [lo, hi) of this epoch's unit order."""
        cursor = 0
        for unit in epoch_units(self.units, self.config.seed, self.epoch, self.config.shuffle):
            start, cursor = cursor, cursor + unit.num_rows
            if cursor <= lo or start >= hi:
                continue
            block = read_block(self.files[unit.file], unit.row_group, self.spec)
            shift = unit.first_row - start  # the epoch's row r is row r + shift of the row group
            block = block.slice(max(lo, start) + shift, min(hi, cursor) + shift)
            yield block.truncate(self.config.max_seq_len)


def reader_units(files: list[FileInfo], config: ReaderConfig) -> list[Unit]:
    """The row ranges a reader reads: the split's head, or everything after it."""
    held, rest = split_head(file_units(files), config.head_rows)
    if config.only_head:
        return held  # all of the split when it is no longer than head_rows (a validation cap)
    if config.head_rows and not rest:
        total = sum(f.num_rows for f in files)
        raise DataError(f"head_rows={config.head_rows} leaves no rows of the split's {total}")
    return rest


def _shuffle_buffer(
    blocks: Iterator[SequenceBlock], size: int, rng: np.random.Generator, bucket: int = 0
) -> Iterator[SequenceBlock]:
    """Approximate global shuffle with bounded memory: fill to ``size`` rows, permute, emit half.

    With ``bucket`` > 0 (the batch size), each emitted chunk is a whole number of batches whose
    rows have similar lengths: the chunk is sorted by length, cut into batches, and the batches
    are put in random order. Real histories are very skewed, so random batches are mostly
    padding; bucketed ones waste little. A buffer smaller than a batch fills up to one batch.
    """
    pending, n = [], 0
    for block in blocks:
        pending.append(block)
        n += len(block)
        emit = n - size // 2 if n >= size else 0
        if bucket:
            emit -= emit % bucket  # whole batches only: none yet means reading on
        if emit:
            merged = SequenceBlock.concat(pending)
            perm = rng.permutation(n)
            yield _bucketed(merged.take(perm[:emit]), bucket, rng) if bucket else merged.take(perm[:emit])
            pending, n = [merged.take(perm[emit:])], n - emit
    if n:
        merged = SequenceBlock.concat(pending).take(rng.permutation(n))
        yield _bucketed(merged, bucket, rng) if bucket else merged


def _sorted_windows(blocks: Iterator[SequenceBlock], size: int) -> Iterator[SequenceBlock]:
    """Unshuffled reading with length bucketing (evaluation): windows of ``size`` rows, each
    sorted by length (stable), so batches pad little; deterministic, every row exactly once."""
    pending, n = [], 0
    for block in blocks:
        pending.append(block)
        n += len(block)
        if n >= size:
            merged = SequenceBlock.concat(pending)
            yield merged.take(np.argsort(merged.lengths, kind="stable"))
            pending, n = [], 0
    if n:
        merged = SequenceBlock.concat(pending)
        yield merged.take(np.argsort(merged.lengths, kind="stable"))


def _bucketed(block: SequenceBlock, batch_size: int, rng: np.random.Generator) -> SequenceBlock:
    """Rows sorted by length in groups of ``batch_size``, the groups in random order."""
    by_length = np.argsort(block.lengths, kind="stable")
    groups = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    full = [g for g in groups if len(g) == batch_size]
    order = rng.permutation(len(full))
    rest = [g for g in groups if len(g) < batch_size]  # a short group stays last (final batch)
    return block.take(np.concatenate([full[i] for i in order] + rest))


def _cut(blocks: Iterator[SequenceBlock], sizes: list[int]) -> Iterator[SequenceBlock]:
    """Re-cut a stream of blocks into blocks of exactly ``sizes`` rows."""
    sizes = iter(sizes)
    want = next(sizes, None)
    pending, n = [], 0
    for block in blocks:
        pending.append(block)
        n += len(block)
        while want is not None and n >= want:
            merged = SequenceBlock.concat(pending)
            yield merged.slice(0, want)
            pending, n = [merged.slice(want, n)], n - want
            want = next(sizes, None)
    assert want is None and n == 0, f"row count mismatch: {n} rows left, next batch {want}"
