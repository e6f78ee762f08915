"""The sequence-row schema: the one definition of what a feedsr Parquet file holds.

One row is one training example: one member's impressions, oldest first. Per-impression values are
list columns that all have the same length in a row; ``num_targets`` says how many of the trailing
impressions are targets (the rest is history only).

Fixed columns (``SEQUENCE_COLUMNS``) plus three families recognised by prefix:

- ``cat_<name>``: list<int>, a small per-impression categorical (post type, surface/tab, ...);
- ``dense_<name>``: list<float>, a numeric feature of the post that enters its post token beside
  the id embeddings (the paper's "identity" transform: e.g. one dimension of a content embedding);
- ``ctx_<name>``: list<float>, a late-fusion context feature valued as of the impression time;
- ``true_<action>``: list<float>, the true probability of <action> (synthetic data only; lets
  evaluation report the oracle).

The action names (the meaning of each bit of ``action_bits``) travel in the file's key-value
metadata under ``feedsr.action_names`` (a JSON list) and must match the data config.
Integer and float widths are not forced (Spark and DuckDB write int32 or int64 as they like); the
kind (integer vs floating, list vs scalar) is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ACTION_NAMES_KEY = b"feedsr.action_names"
CATEGORICAL_PREFIX = "cat_"
DENSE_PREFIX = "dense_"
CONTEXT_PREFIX = "ctx_"
TRUE_PROB_PREFIX = "true_"
UNKNOWN_POSITION = -1
MAX_ACTIONS = 62  # action_bits is an int64 bitmask; keep the sign bit clear
# The id columns that may feed an embedding table (the keys of ``data.id_tables``), in table order.
ID_COLUMNS = ("item_ids", "author_ids")


class DataError(ValueError):
    """Bad input data. The message names the file, and the column/row group/row where known."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int" or "float"
    per_impression: bool  # a list aligned with item_ids, or one scalar per row
    doc: str


SEQUENCE_COLUMNS: tuple[Column, ...] = (
    Column("member_id", "int", False, "member (user) id, >= 0"),
    Column("item_ids", "int", True, "post id per impression, >= 0 (hashed into the table size)"),
    Column("author_ids", "int", True, "author id per impression, >= 0"),
    Column("timestamps", "int", True, "impression time, seconds since the epoch (>= 0), non-decreasing"),
    Column("positions", "int", True, "feed position, 0 = top; -1 = unknown"),
    Column("action_bits", "int", True, "multi-hot of the member's actions: bit i = action i"),
    Column("num_targets", "int", False, "how many trailing impressions are targets, 1..length"),
)
COLUMNS_BY_NAME = {c.name: c for c in SEQUENCE_COLUMNS}
PER_IMPRESSION_COLUMNS = tuple(c.name for c in SEQUENCE_COLUMNS if c.per_impression)
PREFIX_KINDS = {CATEGORICAL_PREFIX: "int", DENSE_PREFIX: "float", CONTEXT_PREFIX: "float", TRUE_PROB_PREFIX: "float"}
# The per-impression float families (read as float32; every other list column is an integer).
FLOAT_PREFIXES = tuple(p for p, kind in PREFIX_KINDS.items() if kind == "float")


def arrow_type(kind: str, per_impression: bool) -> pa.DataType:
    """The type feedsr writes for a column of this kind."""
    scalar = {"int": pa.int64(), "float": pa.float32()}[kind]
    return pa.list_(scalar) if per_impression else scalar


def column_kind(name: str) -> tuple[str, bool] | None:
    """(kind, per_impression) of a schema column name, or None if the name is not ours."""
    if name in COLUMNS_BY_NAME:
        c = COLUMNS_BY_NAME[name]
        return c.kind, c.per_impression
    for prefix, kind in PREFIX_KINDS.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return kind, True
    return None


def arrow_schema(
    categorical: list[str] = (),
    context: list[str] = (),
    true_probs: list[str] = (),
    action_names: list[str] | None = None,
    dense: list[str] = (),
) -> pa.Schema:
    """The full Arrow schema for a file with the given optional feature families."""
    names = [c.name for c in SEQUENCE_COLUMNS]
    names += [CATEGORICAL_PREFIX + n for n in categorical]
    names += [DENSE_PREFIX + n for n in dense]
    names += [CONTEXT_PREFIX + n for n in context]
    names += [TRUE_PROB_PREFIX + n for n in true_probs]
    fields = [pa.field(n, arrow_type(*column_kind(n)), nullable=False) for n in names]
    metadata = {ACTION_NAMES_KEY: json.dumps(list(action_names)).encode()} if action_names else None
    return pa.schema(fields, metadata=metadata)


def _kind_matches(dtype: pa.DataType, kind: str, per_impression: bool) -> bool:
    if per_impression:
        if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)):
            return False
        dtype = dtype.value_type
    elif pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return False
    if kind == "int":
        return pa.types.is_integer(dtype)
    return pa.types.is_floating(dtype)


def _describe(kind: str, per_impression: bool) -> str:
    inner = "an integer type" if kind == "int" else "a float type"
    return f"list<{inner}>" if per_impression else inner


def check_schema(path: str | Path, schema: pa.Schema, required: list[str]) -> None:
    """Raise DataError naming the file and column if ``schema`` lacks or mistypes a column.

    ``required`` lists every column the reader will use (fixed columns are always required).
    """
    for name in dict.fromkeys([c.name for c in SEQUENCE_COLUMNS] + list(required)):
        kind = column_kind(name)
        if kind is None:
            raise DataError(f"{path}: column '{name}' is not a feedsr column name")
        idx = schema.get_field_index(name)
        if idx < 0:
            raise DataError(f"{path}: missing column '{name}' (expected {_describe(*kind)})")
        if not _kind_matches(schema.field(idx).type, *kind):
            raise DataError(
                f"{path}: column '{name}' has type {schema.field(idx).type}, "
                f"expected {_describe(*kind)}"
            )


def file_action_names(schema: pa.Schema) -> list[str] | None:
    """The action names recorded in a file's metadata, or None if it records none."""
    meta = schema.metadata or {}
    if ACTION_NAMES_KEY not in meta:
        return None
    return json.loads(meta[ACTION_NAMES_KEY])


def write_sequences(
    table: pa.Table, path: str | Path, action_names: list[str], row_group_size: int = 1024
) -> None:
    """Write sequence rows, cast to feedsr's types and tagged with the action names.

    The file is written to a temporary name and renamed, so a crash never leaves a truncated file
    under the final name.
    """
    if len(action_names) > MAX_ACTIONS:
        raise ValueError(f"at most {MAX_ACTIONS} action types, got {len(action_names)}")
    fields = []
    for name in table.column_names:
        kind = column_kind(name)
        if kind is None:
            raise ValueError(f"column '{name}' is not a feedsr column name")
        fields.append(pa.field(name, arrow_type(*kind), nullable=False))
    schema = pa.schema(fields, metadata={ACTION_NAMES_KEY: json.dumps(list(action_names)).encode()})
    table = table.cast(schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    tmp.replace(path)
