"""Scoring requests as Parquet, and the scores as Parquet.

A request file holds one row per request: a member's history in the training schema
(``feedsr/data/schema.py``: ``member_id``, ``item_ids``, ``author_ids``, ``timestamps``,
``positions``, ``action_bits``, ``cat_<name>``, ``dense_<name>``, ``ctx_<name>``, oldest first;
``num_targets`` may be left out: it is ignored), plus

- ``request_time``: int, seconds since the epoch, when the candidates are shown: at or after the
  history's last impression;
- the candidates, one list column per feature the model reads, the history's column name after
  ``cand_``: ``cand_item_ids``, ``cand_author_ids``, ``cand_cat_<name>`` (list<int>, ids as in the
  prepared data: ``vocab.json`` maps raw ids to them), ``cand_dense_<name>`` (list<float>, the
  candidate post's dense features: its numbers in the post token, e.g. a content embedding),
  ``cand_ctx_<name>`` (list<float>, the candidate's context features as of the request), and
  optionally ``cand_positions`` (the feed slot, read only by a model that scores at the logged
  position; default -1). All of a row's candidate lists have the same length (0 is allowed: that
  request gets no scores); dense and context values must be finite.

Columns the model does not read may be present and are ignored. Errors name the file, the column
and the row, as for training data. The history is cut to its newest impressions that fit the
model (``max_seq_len - 1``: the candidate takes the last position), as training windows are.

The scores file has one row per (request, candidate): ``request`` (the row in the request file),
``member_id``, ``candidate`` (index in the request's lists), ``item_id`` (the candidate's
``cand_item_ids`` when given) and ``p_<task>`` for every task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedsr.data.batch import BatchSpec
from feedsr.data.block import SequenceBlock
from feedsr.data.reader import ReadSpec, table_block
from feedsr.data.schema import (
    FLOAT_PREFIXES,
    UNKNOWN_POSITION,
    DataError,
    check_schema,
    column_kind,
)
from feedsr.serve.candidates import Candidates, candidate_features

CANDIDATE_PREFIX = "cand_"
REQUEST_TIME = "request_time"


@dataclass
class Requests:
    """A row group of requests: histories, candidates, and each request's row in the file."""

    history: SequenceBlock
    candidates: Candidates
    first_row: int


def candidate_columns(spec: BatchSpec) -> list[str]:
    """The candidate columns a model with ``spec`` needs."""
    return [CANDIDATE_PREFIX + c for c in candidate_features(spec)]


def history_spec(spec: BatchSpec) -> ReadSpec:
    """The history columns to read (no true probabilities: requests have no labels)."""
    return ReadSpec(spec.read.action_names, spec.read.categorical, spec.read.context, dense=spec.read.dense)


def check_request_schema(path: Path, schema: pa.Schema, spec: BatchSpec) -> list[str]:
    """DataError naming the file and column for a missing or mistyped column; returns the
    candidate columns to read (``cand_positions`` when present)."""
    read = history_spec(spec)
    check_schema(path, schema.append(pa.field("num_targets", pa.int64())) if "num_targets" not in schema.names
                 else schema, read.columns)
    index = schema.get_field_index(REQUEST_TIME)
    if index < 0:
        raise DataError(f"{path}: missing column '{REQUEST_TIME}' (expected an integer type: seconds)")
    if not pa.types.is_integer(schema.field(index).type):
        raise DataError(f"{path}: column '{REQUEST_TIME}' has type {schema.field(index).type}, "
                        "expected an integer type (seconds since the epoch)")
    columns = candidate_columns(spec) + ([CANDIDATE_PREFIX + "positions"]
                                         if CANDIDATE_PREFIX + "positions" in schema.names else [])
    for name in columns:
        kind, _ = column_kind(name[len(CANDIDATE_PREFIX):])
        index = schema.get_field_index(name)
        expected = "list<an integer type>" if kind == "int" else "list<a float type>"
        if index < 0:
            raise DataError(f"{path}: missing column '{name}' (expected {expected}: the candidates' "
                            f"{name[len(CANDIDATE_PREFIX):]})")
        dtype = schema.field(index).type
        inner = dtype.value_type if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) else None
        ok = inner is not None and (pa.types.is_integer(inner) if kind == "int" else pa.types.is_floating(inner))
        if not ok:
            raise DataError(f"{path}: column '{name}' has type {dtype}, expected {expected}")
    return columns


def read_requests(path: str | Path, spec: BatchSpec, max_history: int) -> Iterator[Requests]:
    """The requests of a file, one row group at a time, validated (DataError naming the file,
    row and column)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e
    columns = check_request_schema(path, file.schema_arrow, spec)
    read = history_spec(spec)
    first_row = 0
    for group in range(file.num_row_groups):
        history_columns = [c for c in read.columns if c in file.schema_arrow.names]
        table = file.read_row_group(group, columns=history_columns + [REQUEST_TIME] + columns)
        if "num_targets" not in table.column_names:  # ignored by scoring; the schema requires it
            table = table.append_column("num_targets", pc.list_value_length(table["item_ids"]).cast(pa.int64()))
        history = table_block(table, read, str(path), group, first_row)
        candidates = read_candidates(table, columns, history, path, group, first_row)
        yield Requests(history.truncate(max_history), candidates, first_row)
        first_row += table.num_rows


def read_candidates(table: pa.Table, columns: list[str], history: SequenceBlock, path: Path, group: int,
                    first_row: int) -> Candidates:
    """The candidates of a row group, checked against the history (request times) and each other."""
    def fail(row: int, message: str) -> DataError:
        return DataError(f"{path}: row group {group}, row {first_row + row} (of the file): {message}")

    times = table[REQUEST_TIME]
    if times.null_count:
        raise fail(int(np.flatnonzero(pc.is_null(times).to_numpy(zero_copy_only=False))[0]),
                   f"column '{REQUEST_TIME}' is null")
    times = times.to_numpy().astype(np.int64)
    last = history.values["timestamps"][history.offsets[1:] - 1]
    early = times < last
    if early.any():
        row = int(np.flatnonzero(early)[0])
        raise fail(row, f"column '{REQUEST_TIME}' ({times[row]}) is before the history's last impression "
                        f"({last[row]}): candidates are shown after the history")
    counts, values = None, {}
    for name in columns:
        column = table[name].combine_chunks()
        if column.null_count or column.flatten().null_count:
            nulls = pc.is_null(column).to_numpy(zero_copy_only=False)
            row = int(np.flatnonzero(nulls)[0]) if nulls.any() else _row_with_null_value(column)
            raise fail(row, f"column '{name}' contains nulls")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        if counts is None:
            counts, first = lengths, name
        elif not np.array_equal(lengths, counts):
            row = int(np.flatnonzero(lengths != counts)[0])
            raise fail(row, f"column '{name}' has {lengths[row]} candidates but '{first}' has {counts[row]}")
        flat = column.flatten().to_numpy(zero_copy_only=False)
        feature = name[len(CANDIDATE_PREFIX):]
        values[feature] = flat.astype(np.float32 if feature.startswith(FLOAT_PREFIXES) else np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    for feature, flat in values.items():
        if feature.startswith(FLOAT_PREFIXES):
            bad, what = ~np.isfinite(flat), "a non-finite value"
        elif feature == "positions":
            bad, what = flat < UNKNOWN_POSITION, f"a value below {UNKNOWN_POSITION}"
        else:
            bad, what = flat < 0, "a negative id"
        if bad.any():
            raise fail(int(owner[np.flatnonzero(bad)[0]]), f"column '{CANDIDATE_PREFIX}{feature}' has {what}")
    if counts.sum() == 0:
        raise DataError(f"{path}: row group {group}: no candidates in any request")
    return Candidates(counts=counts, request_times=times, values=values)


def _row_with_null_value(column: pa.Array) -> int:
    """The first row whose list holds a null."""
    nulls = pc.is_null(column.flatten()).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return int(np.repeat(np.arange(len(lengths)), lengths)[np.flatnonzero(nulls)[0]])


def scores_table(requests: Requests, probs: np.ndarray, task_names: list[str]) -> pa.Table:
    """One row per (request, candidate) of a row group with every task's probability."""
    counts = requests.candidates.counts
    row = np.repeat(np.arange(len(counts)), counts)
    columns = {
        "request": row + requests.first_row,
        "member_id": requests.history.rows["member_id"][row],
        "candidate": np.arange(len(row)) - np.repeat(requests.candidates.offsets[:-1], counts),
    }
    if "item_ids" in requests.candidates.values:
        columns["item_id"] = requests.candidates.values["item_ids"]
    columns |= {f"p_{task}": probs[:, k].astype(np.float32) for k, task in enumerate(task_names)}
    return pa.table(columns)
