"""``engine=spark``: the pipeline's SQL on Spark SQL (local PySpark) gives the same dataset as on
DuckDB, file for file. Marked ``spark`` (and slow): `make test-spark` installs PySpark and a Java
runtime, then runs these; `make test` does not."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from feedsr.prepare.config import PrepareError
from feedsr.prepare.pipeline import run
from test_prepare import config, make_log, write_items, write_log, write_members

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def three_splits(log: dict) -> list[int]:
    """History, then train / valid / test over the log's time span."""
    lo, hi = int(log["ts"].min()), int(log["ts"].max()) + 1
    return [lo + (hi - lo) * q // 10 for q in (2, 5, 7)] + [hi]


def spark(cfg: dict, tmp_path) -> dict:
    return cfg | {"engine": {"name": "spark", "threads": 2, "memory_limit": "1GB",
                             "temp_directory": str(tmp_path)}}


def dataset_files(out) -> dict[str, object]:
    """Every file of a prepared dataset: Parquet as Arrow tables, JSON parsed, the rest as bytes."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        if path.suffix == ".parquet":
            files[name] = pq.read_table(path)
        else:  # dataset.json, vocab.json, the folder's feedsr marker
            files[name] = json.loads(path.read_text()) if path.suffix == ".json" else path.read_bytes()
    return files


def test_spark_gives_the_same_dataset_as_duckdb(tmp_path):
    log = make_log(seed=3, n=600, members=8)
    write_members(tmp_path / "members.parquet")
    log_path, items = write_log(log, tmp_path / "log.parquet"), write_items(tmp_path / "items.parquet")
    cfg = config(log_path, items, tmp_path / "duckdb", three_splits(log), max_seq_len=16)
    meta = run(cfg)
    # Spark reads the result in chunks of a few members (several rid ranges), DuckDB in one
    assert run(spark(cfg | {"out": str(tmp_path / "spark")}, tmp_path), chunk_rows=100) == meta
    duck, spk = dataset_files(tmp_path / "duckdb"), dataset_files(tmp_path / "spark")
    assert sorted(spk) == sorted(duck)
    assert sum(name.endswith(".parquet") for name in duck) >= 6  # rows_per_file 3: several files per split
    for name, expected in duck.items():
        if name.endswith(".parquet"):
            assert spk[name].equals(expected), name  # same rows, values, order and types
        else:
            assert spk[name] == expected, name
    assert all(meta["splits"][s]["targets"] > 0 for s in ("train", "valid", "test"))
    assert sorted(meta["features"]) == sorted(f["name"] for f in cfg["features"])
    # the scratch folder is gone
    assert not list(tmp_path.glob("feedsr-spark-*"))


def test_spark_names_the_file_and_column_of_bad_input(tmp_path):
    log = make_log(n=100)
    log["click"][5] = 2
    write_members(tmp_path / "members.parquet")
    log_path, items = write_log(log, tmp_path / "log.parquet"), write_items(tmp_path / "items.parquet")
    cfg = spark(config(log_path, items, tmp_path / "out", [int(log["ts"].min()), int(log["ts"].max()) + 1]),
                tmp_path)
    with pytest.raises(PrepareError, match=r"log\.parquet: column 'click' \(action 'click'\) has 1 values "
                                           r"that are not 0 or 1 \(e\.g\. 2\)"):
        run(cfg)
