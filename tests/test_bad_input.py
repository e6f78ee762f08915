"""Every kind of bad input gets a clear error naming the file (and column / row where known)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ACTIONS, SPEC, random_rows
from feedsr.data.reader import ReaderConfig, SequenceReader, open_file, open_files, split_files
from feedsr.data.schema import DataError, write_sequences


def good_file(tmp_path, rows=20, name="part-00000.parquet"):
    path = tmp_path / name
    write_sequences(random_rows(rows, seed=0), path, ACTIONS, row_group_size=8)
    return path


def read_all(path):
    reader = SequenceReader([open_file(path, SPEC)], SPEC, ReaderConfig(batch_size=64))
    return list(reader)


def expect(match, fn, *args):
    with pytest.raises(DataError, match=match) as err:
        fn(*args)
    return str(err.value)


def replace_column(table, name, values):
    return table.set_column(table.schema.get_field_index(name), name, values)


def list_of(offsets_from, values):
    return pa.ListArray.from_arrays(offsets_from.offsets, pa.array(values))


def test_truncated_file(tmp_path):
    path = good_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect(re.escape(str(path)) + ".*not a readable Parquet file", open_file, path, SPEC)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.parquet"
    path.touch()
    expect(re.escape(str(path)) + ".*empty \\(0 bytes\\)", open_file, path, SPEC)


def test_not_parquet(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("member_id,item_ids\n1,2\n")
    expect(re.escape(str(path)) + ".*not a readable Parquet file", open_file, path, SPEC)


def test_missing_file_and_split(tmp_path):
    expect("no such file", open_file, tmp_path / "nope.parquet", SPEC)
    expect("split directory does not exist", split_files, tmp_path, "valid")
    (tmp_path / "valid").mkdir()
    expect("no \\*.parquet files", split_files, tmp_path, "valid")


def test_missing_column(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(random_rows(5, 0).drop_columns(["author_ids"]), path)
    msg = expect("missing column 'author_ids'", open_file, path, SPEC)
    assert str(path) in msg


def test_missing_configured_context_column(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(random_rows(5, 0).drop_columns(["ctx_age"]), path)
    expect(f"{re.escape(str(path))}: missing column 'ctx_age'", open_file, path, SPEC)


def test_wrong_type(tmp_path):
    table = random_rows(5, 0)
    as_float = table.column("timestamps").cast(pa.list_(pa.float64()))
    path = tmp_path / "x.parquet"
    pq.write_table(replace_column(table, "timestamps", as_float), path)
    expect(f"{re.escape(str(path))}: column 'timestamps' has type list<.*double>, expected list<an integer",
           open_file, path, SPEC)
    scalar = replace_column(table, "member_id", pa.array([str(i) for i in range(5)]))
    pq.write_table(scalar, path)
    expect("column 'member_id' has type string", open_file, path, SPEC)


def test_other_action_names(tmp_path):
    path = tmp_path / "x.parquet"
    write_sequences(random_rows(5, 0), path, ["click", "like", "comment"])
    expect("action names \\['click', 'like', 'comment'\\] differ", open_file, path, SPEC)


def test_file_without_rows(tmp_path):
    path = tmp_path / "x.parquet"
    write_sequences(random_rows(5, 0).slice(0, 0), path, ACTIONS)
    expect(f"{re.escape(str(path))}: file has no rows", open_file, path, SPEC)


@pytest.mark.parametrize("column,value,message", [
    ("item_ids", -5, "column 'item_ids' has a negative id"),
    ("author_ids", -1, "column 'author_ids' has a negative id"),
    ("cat_surface", -2, "column 'cat_surface' has a negative value"),
    ("action_bits", 1 << 3, "column 'action_bits' has bits beyond the 3 actions"),
    ("positions", -7, "column 'positions' has a value below -1"),
    ("ctx_age", float("nan"), "column 'ctx_age' has a non-finite value"),
])
def test_value_out_of_range_names_row_group_and_row(tmp_path, column, value, message):
    table = random_rows(20, 0)
    lengths = np.array([len(x) for x in table.column("item_ids").to_pylist()])
    flat = table.column(column).combine_chunks()
    values = flat.flatten().to_numpy(zero_copy_only=False).copy()
    values[lengths[:13].sum() + 1 if lengths[13] > 1 else lengths[:13].sum()] = value  # row 13
    table = replace_column(table, column, list_of(flat, values.astype(values.dtype)))
    path = tmp_path / "x.parquet"
    write_sequences(table, path, ACTIONS, row_group_size=8)
    msg = expect(re.escape(message), read_all, path)
    assert f"{path}: row group 1, row 13 (of the file)" in msg


def test_empty_sequence(tmp_path):
    table = random_rows(6, 0)
    rows = table.to_pylist()
    for col in ["item_ids", "author_ids", "timestamps", "positions", "action_bits", "cat_surface", "ctx_age"]:
        rows[4][col] = []
    path = tmp_path / "x.parquet"
    write_sequences(pa.Table.from_pylist(rows, schema=table.schema), path, ACTIONS)
    expect("row 4 \\(of the file\\): empty sequence", read_all, path)


def test_mismatched_list_lengths(tmp_path):
    table = random_rows(6, 0)
    rows = table.to_pylist()
    rows[2]["positions"] = rows[2]["positions"] + [3]
    path = tmp_path / "x.parquet"
    write_sequences(pa.Table.from_pylist(rows, schema=table.schema), path, ACTIONS)
    expect("row 2 \\(of the file\\): column 'positions' has \\d+ values but 'item_ids' has \\d+",
           read_all, path)


@pytest.mark.parametrize("num_targets", [0, 99])
def test_num_targets_out_of_range(tmp_path, num_targets):
    table = random_rows(6, 0)
    rows = table.to_pylist()
    rows[3]["num_targets"] = num_targets
    path = tmp_path / "x.parquet"
    write_sequences(pa.Table.from_pylist(rows, schema=table.schema), path, ACTIONS)
    expect(f"row 3 \\(of the file\\): num_targets={num_targets} outside \\[1, ", read_all, path)


def test_timestamps_going_backwards(tmp_path):
    table = random_rows(6, 0)
    rows = table.to_pylist()
    for col in ["item_ids", "author_ids", "positions", "action_bits", "cat_surface", "ctx_age"]:
        rows[1][col] = rows[1][col][:1] * 3
    rows[1]["timestamps"], rows[1]["num_targets"] = [100, 50, 200], 1
    path = tmp_path / "x.parquet"
    write_sequences(pa.Table.from_pylist(rows, schema=table.schema), path, ACTIONS)
    expect("row 1 \\(of the file\\): column 'timestamps' decreases", read_all, path)


def test_negative_timestamps(tmp_path):
    table = random_rows(6, 0)
    rows = table.to_pylist()
    rows[2]["timestamps"] = [-5] + rows[2]["timestamps"][1:]
    path = tmp_path / "x.parquet"
    write_sequences(pa.Table.from_pylist(rows, schema=table.schema), path, ACTIONS)
    expect("row 2 \\(of the file\\): column 'timestamps' is negative", read_all, path)


def test_file_without_action_names_is_read_with_a_warning(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "part-0000.parquet"
    pq.write_table(random_rows(5, 0), path)  # no feedsr metadata: written by another tool
    with pytest.warns(UserWarning, match="part-0000.parquet: no feedsr.action_names metadata; its "
                                         "action_bits are read as \\['click', 'like', 'share'\\]"):
        read_all(path)


def test_nulls(tmp_path):
    table = random_rows(4, 0)
    nulled = pa.array([1, None, 3, 4], pa.int64())
    path = tmp_path / "x.parquet"
    pq.write_table(replace_column(table, "num_targets", nulled), path)
    expect("column 'num_targets' contains nulls", read_all, path)


def test_bad_file_among_good_ones_is_found_before_training(tmp_path):
    split = tmp_path / "train"
    good_file(split, name="part-00000.parquet")
    (split / "part-00001.parquet").write_bytes(b"")
    expect("part-00001.parquet: file is empty", open_files, split_files(tmp_path, "train"), SPEC)


@pytest.mark.parametrize("overrides,message", [
    ({"shuffle_buffer": -1}, "data.shuffle_buffer must be >= 0, got -1"),
    ({"id_tables": {"author_ids": 0}}, "data.id_tables.author_ids must be >= 1 or null (the dataset's vocabulary size), got 0"),
    ({"categorical": {"surface": -3}}, "data.categorical.surface must be >= 1 or null (the dataset's vocabulary size), got -3"),
    ({"action_names": ["click", "like", "click"]},
     "data.action_names has duplicates: ['click', 'like', 'click']"),
    ({"action_names": [f"a{i}" for i in range(63)], "tasks": [{"name": "a0"}]},
     "data.action_names: at most 62 actions fit in action_bits, got 63"),
    ({"context": ["age", "age"]}, "data.context has duplicates: ['age', 'age']"),
])
def test_bad_data_config_names_key_and_value(overrides, message):
    from feedsr.data.config import DataConfig

    kw = {"action_names": ["click", "like"], "tasks": [{"name": "click"}], "id_tables": {"item_ids": 10}}
    with pytest.raises(ValueError, match=re.escape(message)):
        DataConfig(**(kw | overrides))


def test_malformed_dataset_json_names_the_file(tmp_path):
    """It raised a bare JSONDecodeError naming no file."""
    from feedsr.data.sequences import read_dataset_meta

    (tmp_path / "dataset.json").write_text('{"action_names": ["click", ')  # cut by a full disk
    expect(r"dataset.json: not valid JSON \(.*\); re-make the dataset or fix the file", read_dataset_meta, tmp_path)
    (tmp_path / "dataset.json").write_text('["click"]')
    expect(r"dataset.json: expected a JSON object, got list", read_dataset_meta, tmp_path)
