"""Bad input and bad config for ``feedsr.prepare``: one clear error naming the file and column (or
the config key), from ``run`` and from the command line (exit non-zero, one line, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from feedsr.prepare.config import CONFIG_DIR, PrepareError, to_prepare_config
from feedsr.prepare.pipeline import run
from test_prepare import config, make_log, one_split, write_items, write_log, write_members


def log_table(**changes) -> pa.Table:
    """The small test log as Arrow, with columns replaced (an array) or dropped (None)."""
    log = make_log()
    columns = dict(log)
    columns["author_id"] = pa.array(log["author_id"], pa.int64(), mask=np.isnan(log["author_id"]))
    for name, values in changes.items():
        if values is None:
            del columns[name]
        else:
            columns[name] = values
    return pa.table(columns)


def with_value(column: str, value, dtype=pa.int64()) -> pa.Array:
    """The log's ``column`` with row 7 set to ``value`` (None: null)."""
    values = make_log()[column].tolist()
    values[7] = value
    return pa.array(values, dtype)


def prepare(tmp_path, table: pa.Table, items: pa.Table | None = None, csv: bool = False, **extra):
    log_path = tmp_path / ("log.csv" if csv else "log.parquet")
    (pacsv.write_csv if csv else pq.write_table)(table, log_path)
    items_path = tmp_path / "items.parquet"
    write_members(tmp_path / "members.parquet")
    if items is None:
        write_items(items_path)
    else:
        pq.write_table(items, items_path)
    bounds = one_split(make_log())  # seconds, whatever the log's unit
    return run(config(log_path, items_path, tmp_path / "out", bounds, **extra)), log_path, items_path


@pytest.mark.parametrize("changes, csv, pattern", [
    ({"click": None}, False, r"log\.parquet: missing column 'click' \(columns\.actions\.click\)"),
    ({"ts": pa.array(make_log()["ts"].astype(str))}, False,
     r"log\.parquet: column 'ts' \(columns\.timestamp\) has type VARCHAR, expected an integer type"),
    ({"member_id": pa.array(make_log()["member_id"] * 1.5)}, True,
     r"log\.csv: column 'member_id' \(columns\.member\) has type DOUBLE"),
    ({"like": with_value("like", 2)}, False, r"log\.parquet: column 'like' \(action 'like'\) has 1 values "
                                             r"that are not 0 or 1 \(e\.g\. 2\)"),
    ({"like": with_value("like", None)}, False, r"column 'like' \(action 'like'\) has 1 values that are not 0 or 1"),
    ({"member_id": with_value("member_id", None)}, False, r"log\.parquet: column 'member_id' \(columns\.member\) has 1 null values"),
    ({"item_id": with_value("item_id", None)}, True, r"log\.csv: column 'item_id' \(columns\.item\) has 1 null values"),
    ({"ts": pa.array(make_log()["ts"] * 1000)}, False,
     r"log\.parquet: column 'ts' read as time\.unit='s' spans year \d+ \.\. year \d+, outside 1990\.\.2100; "
     r"as 'ms' they would be 2023-11-14 \.\. 2023-11-15"),
])
def test_bad_log_names_the_file_and_column(tmp_path, changes, csv, pattern):
    with pytest.raises(PrepareError, match=pattern):
        prepare(tmp_path, log_table(**changes), csv=csv)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_milliseconds_declared_as_seconds_are_caught_the_other_way_too(tmp_path):
    ms = log_table(ts=pa.array(make_log()["ts"] * 1000))
    with pytest.raises(PrepareError, match=r"column 'ts' read as time\.unit='us' spans 1970-01-20"):
        prepare(tmp_path, ms, time={"unit": "us", "timezone": "UTC"})
    meta, _, _ = prepare(tmp_path, ms, time={"unit": "ms", "timezone": "UTC"})  # the right unit works
    assert meta["splits"]["train"]["targets"] == ms.num_rows


def items_table(**changes) -> pa.Table:
    ids = np.arange(11)
    columns = {"item_id": ids, "category": np.array(["a", "b", "c"])[ids % 3], "duration_s": ids * 1.5,
               "created_ts": np.full(11, 1_690_000_000)} | changes
    return pa.table({k: v for k, v in columns.items() if v is not None})


@pytest.mark.parametrize("changes, pattern", [
    ({"item_id": np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4])},
     r"items\.parquet: key column 'item_id' \(item_table\.key\) has duplicate values \(e\.g\. 4\)"),
    ({"item_id": pa.array([0, 1, None, 3, 4, 5, 6, 7, 8, 9, 10], pa.int64())},
     r"items\.parquet: key column 'item_id' \(item_table\.key\) has 1 null values"),
    ({"item_id": np.arange(11).astype(str)},
     r"items\.parquet: key column 'item_id' \(item_table\.key\) has type VARCHAR, but the log's 'item_id' "
     r"\(columns\.item\) has type BIGINT: they cannot be joined"),
    ({"duration_s": None}, r"items\.parquet: missing column 'duration_s' \(item_table\.numeric\)"),
    ({"duration_s": np.array(["x"] * 11)}, r"items\.parquet: column 'duration_s' \(item_table\.numeric\) has "
                                             r"type VARCHAR, expected a numeric type"),
])
def test_bad_side_table_names_the_file_and_column(tmp_path, changes, pattern):
    with pytest.raises(PrepareError, match=pattern):
        prepare(tmp_path, log_table(), items=items_table(**changes))


@pytest.mark.parametrize("change, pattern", [
    ({"features": [{"name": "x", "kind": "impressions", "keys": ["planet"]}]},
     r"features\.x\.keys must be some of \['author', 'category', 'item', 'member', 'segment', 'surface'\], "
     r"got \['planet'\]"),
    ({"features": [{"name": "x", "kind": "action_rate", "keys": ["item"], "action": "buy"}]},
     r"features\.x\.action must be one of columns\.actions \['click', 'like', 'share'\], got 'buy'"),
    ({"features": [{"name": "x", "kind": "impressions", "keys": ["item"], "action": "click"}]},
     r"features\.x\.action must be set for .* and null otherwise, got 'click'"),
    ({"features": [{"name": "x", "kind": "since_impression", "keys": ["item"], "window_s": 60}]},
     r"features\.x\.window_s must be null, or >= 1 for .*, got 60"),
    ({"features": [{"name": "x", "kind": "action_rate", "keys": ["item"], "action": "click", "prior_strength": 0}]},
     r"features\.x\.prior_strength must be > 0, got 0"),
    ({"features": [{"name": "duration_s", "kind": "session_impressions"}]},
     r"context names must be distinct"),
    ({"splits": {"names": ["train", "valid"], "boundaries": ["2024-01-02", "2024-01-01", "2024-01-03"]}},
     r"splits\.boundaries must be increasing"),
    ({"splits": {"names": ["train"], "boundaries": ["2024-01-02"]}}, r"splits\.boundaries must be 2 values"),
    ({"time": {"unit": "ns", "timezone": "UTC"}}, r"time\.unit must be one of \['s', 'ms', 'us'\], got 'ns'"),
    ({"time": {"unit": "s", "timezone": "Mars/Olympus"}}, r"time\.timezone must be an IANA time zone name"),
    ({"max_seq_len": 0}, r"max_seq_len must be >= 1, got 0"),
    ({"member_table": {"path": "m.parquet", "key": "member_id", "created": "joined"}},
     r"member_table\.author/created must be null"),
    ({"engine": {"memory_limit": "lots"}}, r"engine\.memory_limit must be a size such as 512MB or 8GB, got 'lots'"),
    ({"colums": {}}, r"invalid config: Key 'colums' not in 'PrepareConfig'"),
    ({"engine": {"name": "bigquery"}}, r"engine\.name must be one of \['duckdb', 'spark'\], got 'bigquery'"),
    ({"engine": {"window_method": "fast"}}, r"engine\.window_method must be one of"),
    ({"columns": {"member": "member_id", "item": "item_id", "timestamp": "ts", "actions": {"click": "click"},
                  "true_probs": {"like": "p_like"}}}, r"columns\.true_probs must be keyed by actions"),
])
def test_bad_config_names_the_key(tmp_path, change, pattern):
    cfg = config(tmp_path / "log.parquet", tmp_path / "items.parquet", tmp_path / "out", ["0", "1"]) | change
    with pytest.raises(PrepareError, match=pattern):
        to_prepare_config(cfg)


def test_engine_group_picks_the_engine_without_overriding_a_configs_own():
    from feedsr.prepare.config import compose_prepare_config

    engine = lambda *overrides: compose_prepare_config(list(overrides)).prepare.engine.name  # noqa: E731
    assert engine() == "duckdb" and engine("engine=spark") == "spark"
    assert engine("prepare.engine.name=spark") == "spark"  # as a prepare/<name>.yaml may set it


def test_split_boundaries_read_dates_in_the_time_zone():
    cfg = config("log.parquet", "items.parquet", "out", ["2024-01-01", "2024-01-02T06:00", "1704200000"],
                 time={"unit": "ms", "timezone": "Asia/Shanghai"})
    splits = to_prepare_config(cfg).split_list()
    assert [(s.start, s.end) for s in splits] == [(1704038400, 1704146400), (1704146400, 1704200000)]


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    """`python -m feedsr.prepare` with a user's own config folder (as the README shows)."""
    pq.write_table(log_table(click=None), tmp_path / "log.parquet")
    write_items(tmp_path / "items.parquet")
    (tmp_path / "conf" / "prepare").mkdir(parents=True)
    (tmp_path / "conf" / "prepare" / "mine.yaml").write_text(
        "logs: [log.parquet]\nout: out\ncolumns: {member: member_id, item: item_id, timestamp: ts, "
        "actions: {click: click, like: like}}\nsplits: {names: [train], boundaries: [1700000000, 1800000000]}\n")
    cmd = [sys.executable, "-m", "feedsr.prepare", "--config-dir", str(tmp_path / "conf"), "prepare=mine"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    assert bad.stderr.strip() == ("feedsr.prepare: log.parquet: missing column 'click' (columns.actions.click); "
                                  "it has ['author_id', 'item_id', 'like', 'member_id', 'position', 'share', "
                                  "'surface', 'ts']"), bad.stderr
    pq.write_table(log_table(), tmp_path / "log.parquet")
    good = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    assert "wrote out/dataset.json" in good.stdout and (tmp_path / "out" / "train").is_dir()


def test_readme_example_config_is_valid(tmp_path):
    """The YAML of the README's "Bring your own logs" section, through Hydra as a user would run it."""
    from hydra import compose, initialize_config_dir

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Bring your own logs"):]
    block = section[section.index("```yaml\n") + 8: section.index("```\n", section.index("```yaml\n") + 8)]
    (tmp_path / "prepare").mkdir()
    (tmp_path / "prepare" / "mylog.yaml").write_text(block)
    # the package's primary config with the user's folder on the search path (what --config-dir does)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("prepare", overrides=["prepare=mylog", f"hydra.searchpath=[file://{tmp_path}]"])
    prepared = to_prepare_config(cfg)
    assert prepared.time.unit == "ms" and [f.kind for f in prepared.features] == [
        "action_rate", "action_count", "since_action", "session_impressions"]
    assert [s.start for s in prepared.split_list()][0] == 1650816000  # 2022-04-25 00:00 UTC+8


def test_output_never_overwrites_a_users_directory(tmp_path):
    """`out` pointing at a directory of the user's files is refused before any work, untouched."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00000-c000.snappy.parquet").write_bytes(b"the user's data")
    with pytest.raises(PrepareError, match=r"out: .*out: refusing to write a dataset into a directory feedsr "
                                           r"did not create \(it holds part-00000-c000.snappy.parquet\)"):
        prepare(tmp_path, log_table())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-00000-c000.snappy.parquet"]
    (tmp_path / "out" / "part-00000-c000.snappy.parquet").unlink()
    meta, _, _ = prepare(tmp_path, log_table())  # empty now: prepared, and again over its own output
    assert prepare(tmp_path, log_table())[0]["splits"] == meta["splits"]


def dense_columns(**extra) -> dict:
    """The test config's log columns with a dense feature (``columns.dense``) read from 'emb'."""
    columns = {"member": "member_id", "item": "item_id", "timestamp": "ts", "author": "author_id",
               "position": "position", "actions": {"click": "click", "like": "like", "share": "share"},
               "categoricals": {"surface": "surface"}, "dense": {"emb_0": "emb"}}
    return columns | extra


def test_dense_columns_reach_the_dataset_as_numbers_in_order(tmp_path):
    """columns.dense: each named log column becomes dense_<name>, value for value, listed in dataset.json."""
    n = len(make_log()["ts"])
    emb = np.linspace(-2.0, 3.0, n)
    meta, _, _ = prepare(tmp_path, log_table(emb=emb), columns=dense_columns())
    assert meta["dense"] == ["emb_0"] and "emb_0" not in meta["context"]
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out" / "train").glob("*.parquet")))
    assert table.schema.field("dense_emb_0").type == pa.list_(pa.float32())
    stored = np.sort(np.concatenate(table["dense_emb_0"].to_numpy(zero_copy_only=False)))
    np.testing.assert_allclose(stored, np.sort(emb.astype(np.float32)))  # every impression, once


@pytest.mark.parametrize("emb, pattern", [
    (None, r"log\.parquet: missing column 'emb' \(columns\.dense\.emb_0\)"),
    ("strings", r"log\.parquet: column 'emb' \(columns\.dense\.emb_0\) has type VARCHAR, expected a numeric type"),
    ("null", r"log\.parquet: column 'emb' \(columns\.dense\.emb_0\) has 1 null values"),
    ("nan", r"log\.parquet: column 'emb' \(columns\.dense\.emb_0\) has 1 NaN or infinite values"),
    ("inf", r"log\.parquet: column 'emb' \(columns\.dense\.emb_0\) has 2 NaN or infinite values"),
])
def test_bad_dense_column_names_the_file_and_column(tmp_path, emb, pattern):
    n = len(make_log()["ts"])
    values = {None: None, "strings": np.array(["x"] * n),
              "null": pa.array([None] + [0.5] * (n - 1), pa.float64()),
              "nan": np.array([0.5] * (n - 1) + [np.nan]),
              "inf": np.array([np.inf, -np.inf] + [0.5] * (n - 2))}[emb]
    table = log_table() if values is None else log_table(emb=values)
    with pytest.raises(PrepareError, match=pattern):
        prepare(tmp_path, table, columns=dense_columns())
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_dense_names_are_checked(tmp_path):
    with pytest.raises(PrepareError, match=r"dense names .*identifiers"):
        prepare(tmp_path, log_table(emb=np.zeros(len(make_log()["ts"]))),
                columns=dense_columns(dense={"not an identifier": "emb"}))
