"""The SQL engines ``feedsr.prepare`` runs on: DuckDB (embedded, one machine, out of core) and
Spark SQL through PySpark (``engine.name=spark``, for logs beyond one machine).

The pipeline speaks to an engine through five calls, so every query it writes runs on both:
``source`` (what a FROM reads for a file or a query), ``column_types``, ``create_table``,
``fetch`` (small results) and ``stream`` (the big sorted result, as Arrow batches). The SQL is a
common subset: CAST rather than ``::``, double-quoted identifiers (Spark is told to read them as
identifiers), explicit NULLS ordering; what still differs (local time, a row id) is in
``feedsr.prepare.features.Dialect``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from feedsr.prepare.config import EngineConfig, PrepareError
from feedsr.prepare.features import DUCKDB, SPARK, Dialect

CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
QUERY_WORDS = ("SELECT", "WITH", "FROM")


def is_query(source: str) -> bool:
    """Whether a source is a SQL query (in the engine's dialect) rather than a file path."""
    words = source.split(None, 1)
    return len(words) == 2 and words[0].upper() in QUERY_WORDS


def is_csv(path: str) -> bool:
    return path.lower().endswith(CSV_SUFFIXES)


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class DuckDBEngine:
    dialect: Dialect = DUCKDB

    def __init__(self, cfg: EngineConfig):
        self.con = duckdb.connect()
        self.con.execute(f"SET memory_limit = '{cfg.memory_limit}'")
        if cfg.threads is not None:
            self.con.execute(f"SET threads = {cfg.threads}")
        if cfg.temp_directory is not None:
            self.con.execute("SET temp_directory = '" + cfg.temp_directory.replace("'", "''") + "'")
        self.con.execute("SET preserve_insertion_order = false")  # every step sorts or groups explicitly

    def source(self, path: str) -> str:
        """A file path (CSV by its suffix, Parquet otherwise) or a query, as a FROM item."""
        if is_query(path):
            return f"({path})"
        literal = "'" + path.replace("'", "''") + "'"
        return f"read_csv({literal})" if is_csv(path) else f"read_parquet({literal})"

    def column_types(self, path: str) -> dict[str, str]:
        try:
            rows = self.con.execute(f"DESCRIBE SELECT * FROM {self.source(path)}").fetchall()
        except duckdb.Error as e:
            raise PrepareError(f"{path}: cannot read it: {first_line(e)}") from None
        return {name: dtype for name, dtype, *_ in rows}

    def create_table(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE TABLE {name} AS {sql}")

    def create_numbered(self, name: str, sql: str, order: str) -> None:
        """Table ``name``: ``sql``'s rows stored sorted by ``order``, with ``rid`` = 1, 2, ... in
        that order. One sort: the sorted rows are inserted in order (preserve_insertion_order),
        and a table's ``rowid`` is its insertion position; numbering with ``row_number() OVER
        (ORDER BY ..)`` and then storing ``ORDER BY rid`` sorts the wide rows twice."""
        self.con.execute("SET preserve_insertion_order = true")
        try:
            self.con.execute(f"CREATE TABLE {name}_sorted AS SELECT * FROM ({sql}) s ORDER BY {order}")
            self.con.execute(f"CREATE TABLE {name} AS SELECT rowid + 1 AS rid, * FROM {name}_sorted")
            self.con.execute(f"DROP TABLE {name}_sorted")
        finally:
            self.con.execute("SET preserve_insertion_order = false")

    def drop_table(self, name: str) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS {name}")

    def fetch(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def column(self, sql: str) -> pa.ChunkedArray:
        """The first column of a query's result (vocabularies: distinct values)."""
        return self.con.sql(sql).to_arrow_table().column(0)

    def stream(self, sql: str, batch_rows: int) -> pa.RecordBatchReader:
        return self.con.sql(sql).to_arrow_reader(batch_rows)

    def close(self) -> None:
        self.con.close()


# Spark type names (DataType.simpleString) -> the DuckDB names the checks in sources.py read.
SPARK_TYPES = {"tinyint": "TINYINT", "smallint": "SMALLINT", "int": "INTEGER", "bigint": "BIGINT",
               "string": "VARCHAR", "float": "FLOAT", "double": "DOUBLE", "boolean": "BOOLEAN"}


class SparkEngine:
    """Spark SQL through PySpark. Tables and the final result are written as Parquet under a
    scratch folder (``engine.temp_directory`` or the system's), so nothing big is collected on the
    driver; the sorted result is read back file by file, in order."""

    dialect: Dialect = SPARK

    def __init__(self, cfg: EngineConfig):
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise PrepareError("engine.name=spark needs PySpark and a Java runtime: `make test-spark` "
                               "installs both (or pip install pyspark)") from None
        self.scratch = Path(tempfile.mkdtemp(prefix="feedsr-spark-", dir=cfg.temp_directory))
        threads = "*" if cfg.threads is None else cfg.threads
        builder = SparkSession.builder.master(cfg.spark_master or f"local[{threads}]").appName("feedsr.prepare")
        conf = {
            "spark.sql.session.timeZone": "UTC",  # local times go through the Dialect, explicitly
            "spark.sql.ansi.enabled": "true",
            "spark.sql.ansi.doubleQuotedIdentifiers": "true",  # "name" is a column, as in DuckDB
            "spark.driver.memory": cfg.memory_limit.replace(" ", "").replace("B", "").lower(),
            "spark.local.dir": str(self.scratch / "local"),
            "spark.ui.enabled": "false",
        } | dict(cfg.spark_conf)
        for key, value in conf.items():
            builder = builder.config(key, value)
        self.spark = builder.getOrCreate()
        self.spark.sparkContext.setLogLevel("ERROR")
        self.views: dict[str, str] = {}
        self.results = 0

    def source(self, path: str) -> str:
        if is_query(path):
            return f"({path})"
        if path not in self.views:
            reader = self.spark.read
            frame = (reader.option("header", True).option("inferSchema", True).csv(path) if is_csv(path)
                     else reader.parquet(path))
            name = f"feedsr_source_{len(self.views)}"
            frame.createOrReplaceTempView(name)
            self.views[path] = name
        return self.views[path]

    def column_types(self, path: str) -> dict[str, str]:
        try:
            schema = self.spark.sql(f"SELECT * FROM {self.source(path)}").schema
        except Exception as e:  # noqa: BLE001 - Spark raises its own (Py4J, Analysis) errors
            raise PrepareError(f"{path}: cannot read it: {first_line(e)}") from None
        types = {}
        for f in schema.fields:
            name = f.dataType.simpleString()
            types[f.name] = "DECIMAL" if name.startswith("decimal") else SPARK_TYPES.get(name, name.upper())
        return types

    def create_table(self, name: str, sql: str) -> None:
        path = self.scratch / name
        self.spark.sql(sql).write.parquet(str(path))
        self.spark.read.parquet(str(path)).createOrReplaceTempView(name)

    def create_numbered(self, name: str, sql: str, order: str) -> None:
        """``sql``'s rows sorted by ``order`` (range partitions, in order) with ``rid`` from
        monotonically_increasing_id: increasing in that order but not dense, without moving all
        rows to one task."""
        self.create_table(name, f"SELECT b.*, monotonically_increasing_id() AS rid "
                                f"FROM (SELECT * FROM ({sql}) s ORDER BY {order}) b")

    def drop_table(self, name: str) -> None:
        self.spark.catalog.dropTempView(name)  # False when there is none
        shutil.rmtree(self.scratch / name, ignore_errors=True)

    def fetch(self, sql: str) -> list[tuple]:
        return [tuple(row) for row in self.spark.sql(sql).collect()]

    def column(self, sql: str) -> pa.ChunkedArray:
        self.results += 1
        path = self.scratch / f"result_{self.results}"
        self.spark.sql(sql).write.parquet(str(path))
        column = pq.read_table(path).column(0)
        shutil.rmtree(path, ignore_errors=True)
        return column

    def stream(self, sql: str, batch_rows: int) -> pa.RecordBatchReader:
        """The result written by Spark (a global ORDER BY writes part files in order), read back
        one file at a time."""
        self.results += 1
        path = self.scratch / f"result_{self.results}"
        frame = self.spark.sql(sql)
        frame.write.parquet(str(path))
        files = sorted(path.glob("part-*.parquet"))
        schema = pq.read_schema(files[0]) if files else frame.limit(0).toArrow().schema

        def batches():
            for file in files:
                yield from pq.ParquetFile(file).iter_batches(batch_rows)
            shutil.rmtree(path, ignore_errors=True)  # read: the next chunk's result takes its place

        return pa.RecordBatchReader.from_batches(schema, batches())

    def close(self) -> None:
        self.spark.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


ENGINES = {"duckdb": DuckDBEngine, "spark": SparkEngine}


def connect(cfg: EngineConfig):
    return ENGINES[cfg.name](cfg)
