"""Flat impression log(s) -> the feedsr dataset layout, on DuckDB.

Steps, each a function below:

1. check the inputs (feedsr/prepare/sources.py): errors name the file, the column and the key;
2. read the logs and drop exact duplicate rows (equal in every log column, counted);
3. build ``events``: one row per impression with its roles (member, item, author, raw time ``t``,
   position, ``act_<action>`` 0/1, ``cat_<name>`` raw values), the side tables joined on, and
   sessions when a feature needs them;
4. dense id vocabularies from the training window (the first split and the history before it;
   0 = unknown), one DISTINCT query per id column;
5. add the point-in-time features (feedsr/prepare/features.py) over all events, then keep those
   before the last split boundary, sorted by (member, time), streamed out of DuckDB;
6. per chunk of whole members (about ``chunk_rows`` impressions), in numpy: ids through the
   vocabularies, action bits, whole-second timestamps; then the existing windowing
   (``feedsr.data.sequences.SplitWriter``) appends each split's rows, and ``dataset.json`` comes last.

Only step 6 holds impressions in Python, one chunk at a time: DuckDB keeps the rest within
``engine.memory_limit`` and spills beyond it, so memory does not grow with the log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedsr.data.output import claim
from feedsr.data.schema import CATEGORICAL_PREFIX, CONTEXT_PREFIX, UNKNOWN_POSITION, DataError
from feedsr.data.sequences import DATASET_META, SplitWriter, check_log, write_dataset_meta
from feedsr.data.tasks import encode_actions
from feedsr.data.vocab import VOCAB_SIZES, UNKNOWN_ID, apply_vocab, build_vocab, vocab_size, write_vocabs
from feedsr.prepare.config import PrepareConfig, PrepareError, to_prepare_config
from feedsr.prepare.engine import connect
from feedsr.prepare.features import feature_sql, needs_sessions, session_sql
from feedsr.prepare.sources import check_logs, check_side_table, quote

SIDE_JOINS = {"item_table": ("it", "item"), "member_table": ("mt", "member")}  # SQL alias, log role joined on
# dataset.json names of the id columns that get a vocabulary, besides the cat_ columns.
ID_ROLES = {"item_ids": "item", "author_ids": "author"}
# Impressions converted in Python at a time (whole members, so a chunk can exceed it by one
# member's history and a batch): a million rows of ~50 columns of 4-8 bytes are ~0.3 GB in numpy,
# as much again in Arrow; small enough beside DuckDB's memory_limit, big enough for numpy speed.
CHUNK_ROWS = 1_000_000
BATCH_ROWS = 65_536  # rows per Arrow batch streamed out of DuckDB


class Progress:
    """Prints one line per step with the seconds since the start (long steps on big logs)."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[prepare {time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


def load_logs(engine, cfg: PrepareConfig, total: int) -> int:
    """Table ``logs``: every log file, exact duplicates dropped; returns how many were dropped.
    The files may order their columns differently: the first file's columns are read by name."""
    columns = ", ".join(map(quote, engine.column_types(cfg.logs[0])))
    union = " UNION ALL ".join(f"SELECT {columns} FROM {engine.source(p)}" for p in cfg.logs)
    engine.create_table("logs", f"SELECT DISTINCT * FROM ({union}) u")
    [(kept,)] = engine.fetch("SELECT count(*) FROM logs")
    return total - kept


def events_sql(cfg: PrepareConfig, engine) -> str:
    """One row per impression with its roles under fixed names (see the module doc)."""
    c, log = cfg.columns, lambda column: f"l.{quote(column)}"
    position = (f"COALESCE(CAST({log(c.position)} AS BIGINT), {UNKNOWN_POSITION})" if c.position
                else f"CAST({UNKNOWN_POSITION} AS BIGINT)")
    cols = [
        f"{engine.dialect.row_id()} AS rid",  # unique; the last tie-break of the sorts
        f"CAST({log(c.member)} AS BIGINT) AS member", f"{log(c.item)} AS item",
        f"CAST({log(c.timestamp)} AS BIGINT) AS t", f"{author_sql(cfg)} AS author", f"{position} AS position",
    ]
    cols += [f"CAST({log(col)} AS INTEGER) AS {quote('act_' + a)}" for a, col in c.actions.items()]
    cols += [f"{log(col)} AS {quote('cat_' + n)}" for n, col in c.categoricals.items()]
    joins = ""
    for role, table in cfg.side_tables().items():
        alias, on = SIDE_JOINS[role]
        joins += (f" LEFT JOIN {engine.source(table.path)} {alias} "
                  f"ON {log(getattr(c, on))} = {alias}.{quote(table.key)}")
        cols += [f"{alias}.{quote(col)} AS {quote('cat_' + col)}" for col in table.categorical]
        cols += [f"COALESCE(CAST({alias}.{quote(col)} AS DOUBLE), {table.fill!r}) AS {quote('ctx_' + col)}"
                 for col in table.numeric]
        if table.created is not None:
            cols.append(f"CAST({alias}.{quote(table.created)} AS BIGINT) AS created")
    return f"SELECT {', '.join(cols)} FROM logs l{joins}"


def author_sql(cfg: PrepareConfig) -> str:
    source = cfg.author_source()
    if source == "log":
        return f"l.{quote(cfg.columns.author)}"
    if source == "item_table":
        return f"{SIDE_JOINS['item_table'][0]}.{quote(cfg.item_table.author)}"
    return "CAST(NULL AS BIGINT)"


def build_events(engine, cfg: PrepareConfig) -> None:
    sql = events_sql(cfg, engine)
    if needs_sessions(cfg):
        sql = session_sql(cfg.session_gap_s, cfg.time_unit(), f"({sql})")
    engine.create_table("events", sql)


def vocab_sources(cfg: PrepareConfig) -> dict[str, str]:
    """dataset.json id column -> the events column it encodes."""
    return dict(ID_ROLES) | {CATEGORICAL_PREFIX + n: CATEGORICAL_PREFIX + n for n in cfg.categorical_names()}


def build_vocabs(engine, cfg: PrepareConfig, train_end: int) -> dict[str, np.ndarray]:
    """Per id column, the vocabulary of its known values in the training window (``t`` before the
    first split's end), computed by DuckDB so that no impression reaches Python."""
    end = train_end * cfg.time_unit()
    vocabs = {}
    for column, source in vocab_sources(cfg).items():
        values = engine.column(f"SELECT DISTINCT {quote(source)} AS v FROM events "
                               f"WHERE t < {end} AND {quote(source)} IS NOT NULL")
        vocabs[column] = build_vocab(values.to_numpy(zero_copy_only=False))
    return vocabs


def count_events(engine, cfg: PrepareConfig, end_second: int) -> int:
    [(n,)] = engine.fetch(f"SELECT count(*) FROM events WHERE t < {end_second * cfg.time_unit()}")
    return n


def output_order(cfg: PrepareConfig) -> str:
    """The order of the impressions in the output: by member and time, then, so that ties in time
    come out the same on every engine and run, by the log's own values; the row id last only
    separates rows equal in all of these."""
    columns = ["member", "t", "item", "position"] + [f"act_{a}" for a in cfg.columns.actions]
    columns += [f"cat_{n}" for n in cfg.columns.categoricals]
    return ", ".join(f"{quote(c)} NULLS LAST" for c in columns + ["rid"])


def featured_events(engine, cfg: PrepareConfig, end_second: int, batch_rows: int) -> pa.RecordBatchReader:
    """The events with their features, before ``end_second``, in ``output_order``, as a stream
    (the engine computes the features and sorts before the first batch)."""
    end = end_second * cfg.time_unit()
    query = (f"SELECT * FROM ({feature_sql(cfg, 'events', engine.dialect)}) f WHERE t < {end} "
             f"ORDER BY {output_order(cfg)}")
    return engine.stream(query, batch_rows)


def member_chunks(batches: pa.RecordBatchReader, chunk_rows: int) -> Iterator[pa.Table]:
    """The stream (sorted by member) cut into tables of whole members, each of at least
    ``chunk_rows`` rows but the last; the rows of the member a cut would split wait for the next."""
    held, rows = [], 0
    for batch in batches:
        held.append(batch)
        rows += batch.num_rows
        if rows < chunk_rows:
            continue
        table = pa.Table.from_batches(held, batches.schema)
        member = table["member"].to_numpy()
        cut = len(member) - int(np.argmax(member[::-1] != member[-1]))  # the last member's first row
        if cut < len(member):  # else one member so far: read on
            yield table.slice(0, cut)
            rest = table.slice(cut)
            held, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(held, batches.schema)


def as_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, known): the column as numpy with nulls filled, and where it is not null."""
    known = pc.is_valid(column).to_numpy(zero_copy_only=False)
    filler = "" if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else 0
    return pc.fill_null(column, filler).to_numpy(zero_copy_only=False), known


def dense_ids(table: pa.Table, vocabs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per id column: 1 + the value's index in its vocabulary; 0 where it is null or unseen in
    training."""
    ids = {}
    for column, vocab in vocabs.items():
        values, known = as_values(table[ID_ROLES.get(column, column)])
        ids[column] = np.where(known, apply_vocab(vocab, values), UNKNOWN_ID)
    return ids


def to_log(table: pa.Table, cfg: PrepareConfig, vocabs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The flat feedsr log (feedsr.data.sequences) of a chunk of featured events."""
    ids = dense_ids(table, vocabs)
    acts = np.stack([table["act_" + a].to_numpy() for a in cfg.columns.actions], axis=1)
    log = {
        "member_id": table["member"].to_numpy().astype(np.int64),
        "item_ids": ids.pop("item_ids"),
        "author_ids": ids.pop("author_ids"),
        "timestamps": np.floor_divide(table["t"].to_numpy(), cfg.time_unit()).astype(np.int64),
        "positions": table["position"].to_numpy().astype(np.int64),
        "action_bits": encode_actions(acts),
    }
    log |= ids
    for name in cfg.context_names():
        log[CONTEXT_PREFIX + name] = table[CONTEXT_PREFIX + name].to_numpy().astype(np.float32)
    return log


def write_splits(out: Path, chunks: Iterator[pa.Table], cfg: PrepareConfig, vocabs: dict[str, np.ndarray],
                 progress: Progress) -> dict[str, dict]:
    """Window every chunk into every split; return the splits' counts."""
    writers = [SplitWriter(out, split, list(cfg.columns.actions), cfg.max_seq_len, cfg.rows_per_file)
               for split in cfg.split_list()]
    done = 0
    for table in chunks:
        log = to_log(table, cfg, vocabs)
        check_log(log)
        for writer in writers:
            writer.add(log)
        done += len(log["member_id"])
        progress(f"windowed {done} impressions")
    return {writer.split.name: writer.close() for writer in writers}


def run(cfg, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Prepare the dataset of a composed config (DictConfig, dict or PrepareConfig); return its
    dataset.json. Raises PrepareError naming the key, file or column for bad config or input.
    ``chunk_rows``: impressions windowed at a time (the output does not depend on it)."""
    cfg = to_prepare_config(cfg)
    splits = cfg.split_list()
    out, progress = Path(cfg.out), Progress()
    try:
        claim(out)  # before any work: a new, empty or feedsr-made directory, never a user's files
    except DataError as e:
        raise PrepareError(f"out: {e}") from None
    engine = connect(cfg.engine)
    try:
        vocabs, counts, duplicates = prepare(engine, cfg, out, chunk_rows, progress)
    finally:
        engine.close()
    vocab_values = {column: vocab.tolist() for column, vocab in vocabs.items()}
    write_vocabs(out, vocab_values)
    meta = dataset_meta(cfg, counts, vocab_values, duplicates)
    write_dataset_meta(out, meta)
    progress(f"wrote {out / DATASET_META}")
    return meta


def prepare(engine, cfg: PrepareConfig, out: Path, chunk_rows: int, progress: Progress):
    """Steps 1-6 on the engine; returns (vocabularies, split counts, duplicates dropped)."""
    splits = cfg.split_list()
    total = check_logs(engine, cfg)
    log_types = engine.column_types(cfg.logs[0])
    for role, table in cfg.side_tables().items():
        on = SIDE_JOINS[role][1]
        column = getattr(cfg.columns, on)
        check_side_table(engine, role, table, (f"columns.{on}", column, log_types[column]))
    progress(f"checked {len(cfg.logs)} log file(s): {total} rows")
    duplicates = load_logs(engine, cfg, total)
    progress(f"dropped {duplicates} exact duplicate rows")
    build_events(engine, cfg)
    impressions = count_events(engine, cfg, splits[-1].end)
    if impressions == 0:
        raise PrepareError(f"{cfg.logs}: no impressions before the last split boundary "
                           f"{cfg.splits.boundaries[-1]} (splits.boundaries; time.unit '{cfg.time.unit}')")
    progress("built events (side tables joined)")
    vocabs = build_vocabs(engine, cfg, splits[0].end)
    sizes = {column: vocab_size(vocab) for column, vocab in vocabs.items()}
    progress(f"built vocabularies from the training window: {sizes}")
    batches = featured_events(engine, cfg, splits[-1].end, min(BATCH_ROWS, chunk_rows))
    progress(f"computed {len(cfg.features)} point-in-time features for {impressions} impressions")
    counts = write_splits(out, member_chunks(batches, chunk_rows), cfg, vocabs, progress)
    for name, split_counts in counts.items():
        progress(f"wrote {name}: {split_counts}")
    return vocabs, counts, duplicates


def dataset_meta(cfg: PrepareConfig, counts: dict, vocabs: dict, duplicates: int) -> dict:
    return {
        "source": cfg.name,
        "action_names": list(cfg.columns.actions),
        "categorical": cfg.categorical_names(),
        "context": cfg.context_names(),
        "true_probs": [],
        VOCAB_SIZES: {column: vocab_size(values) for column, values in vocabs.items()},
        "splits": counts,
        "duplicates_dropped": duplicates,
        "inputs": list(cfg.logs) + [t.path for t in cfg.side_tables().values()],
        "time_unit": cfg.time.unit,
        "timezone": cfg.time.timezone,
        "max_seq_len": cfg.max_seq_len,
        "features": {f.name: f.kind for f in cfg.features},
    }
