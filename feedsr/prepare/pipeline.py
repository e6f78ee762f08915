"""Flat impression log(s) -> the feedsr dataset layout, on a SQL engine (DuckDB, or Spark SQL:
feedsr/prepare/engine.py).

Steps, each a function below:

1. check the inputs (feedsr/prepare/sources.py): errors name the file, the column and the key;
2. read the logs' role columns and drop exact duplicate rows (equal in every log column,
   counted); add the pre-window history rows (``history.logs``) of members the log has;
3. build ``events``: one row per impression with its roles (member, item, author, raw time ``t``,
   position, ``act_<action>`` 0/1, ``cat_<name>`` raw values, pass-through ``ctx_``/``true_``
   numbers), the side tables joined on; stored in the output order (member, time, then the log's
   values for ties) with ``rid`` increasing in it;
4. dense id vocabularies from the training window (the first split and the history before it;
   0 = unknown), one DISTINCT query per id column;
5. the point-in-time features (feedsr/prepare/features.py) of the key sets without the member,
   one table per key set over the whole log, each holding ``rid`` and its features, stored in
   rid order;
6. per chunk of whole members (a rid range of about ``chunk_rows`` impressions): the events and
   every feature table read over that range, and the member's key sets (sessions included)
   computed over it, side by side (no join: one row per rid in each);
   then in numpy: ids through the vocabularies, action bits, whole-second timestamps, and the
   existing windowing (``feedsr.data.sequences.SplitWriter``) appends each split's rows, the
   splits written in parallel threads while the engine reads the next chunk; ``dataset.json``
   comes last.

Only step 6 holds impressions in Python, one chunk at a time: the engine keeps the rest within
``engine.memory_limit`` and spills beyond it, so memory does not grow with the log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedsr.data.output import claim
from feedsr.data.schema import (
    CATEGORICAL_PREFIX,
    CONTEXT_PREFIX,
    DENSE_PREFIX,
    TRUE_PROB_PREFIX,
    UNKNOWN_POSITION,
    DataError,
)
from feedsr.data.sequences import DATASET_META, SplitWriter, check_log, write_dataset_meta
from feedsr.data.tasks import encode_actions
from feedsr.data.vocab import VOCAB_SIZES, UNKNOWN_ID, apply_vocab, build_vocab, vocab_size, write_vocabs
from feedsr.prepare.config import PrepareConfig, PrepareError, to_prepare_config
from feedsr.prepare.engine import connect
from feedsr.prepare.features import (
    KeySet,
    feature_tables,
    key_column,
    key_sets,
    plan_key_sets,
    range_queries,
    windowed,
)
from feedsr.prepare.sources import check_history, check_logs, check_side_table, log_roles, quote

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


HISTORY = "feedsr_history"  # 1 on pre-window history rows (history.logs), 0 on the log's


def role_columns(cfg: PrepareConfig) -> str:
    return ", ".join(dict.fromkeys(quote(column) for _, column, _ in log_roles(cfg)))


def load_logs(engine, cfg: PrepareConfig, total: int) -> tuple[int, int]:
    """Table ``logs``: the role columns of every log file, exact duplicates (equal in every
    column) dropped, then the pre-window history rows of members the log has; returns (duplicates
    dropped, history impressions kept). Columns are read by name (files may order them
    differently)."""
    columns = ", ".join(map(quote, engine.column_types(cfg.logs[0])))
    union = " UNION ALL ".join(f"SELECT {columns} FROM {engine.source(p)}" for p in cfg.logs)
    roles = role_columns(cfg)
    if not cfg.history.logs:
        engine.create_table("logs", f"SELECT {roles}, 0 AS {HISTORY} FROM (SELECT DISTINCT * FROM ({union}) u) d")
        [(kept,)] = engine.fetch("SELECT count(*) FROM logs")
        return total - kept, 0
    engine.create_table("log_rows", f"SELECT DISTINCT * FROM ({union}) u")
    history = " UNION ALL ".join(f"SELECT {roles} FROM {engine.source(p)}" for p in cfg.history.logs)
    member = quote(cfg.columns.member)
    engine.create_table("logs", f"SELECT {roles}, 0 AS {HISTORY} FROM log_rows UNION ALL "
                                f"SELECT {roles}, 1 AS {HISTORY} FROM (SELECT DISTINCT * FROM ({history}) h) d "
                                f"WHERE {member} IN (SELECT {member} FROM log_rows)")
    [(kept, history_rows)] = engine.fetch(f"SELECT count(*) FILTER (WHERE {HISTORY} = 0), "
                                          f"count(*) FILTER (WHERE {HISTORY} = 1) FROM logs")
    return total - kept, history_rows


def events_sql(cfg: PrepareConfig, engine) -> str:
    """One row per impression with its roles under fixed names (see the module doc)."""
    c, log = cfg.columns, lambda column: f"l.{quote(column)}"
    position = (f"COALESCE(CAST({log(c.position)} AS BIGINT), {UNKNOWN_POSITION})" if c.position
                else f"CAST({UNKNOWN_POSITION} AS BIGINT)")
    cols = [
        f"CAST({log(c.member)} AS BIGINT) AS member", f"{log(c.item)} AS item",
        f"CAST({log(c.timestamp)} AS BIGINT) AS t", f"{author_sql(cfg)} AS author", f"{position} AS position",
        f"l.{HISTORY} AS history",
    ]
    if c.action_bits is None:
        cols += [f"CAST({log(col)} AS INTEGER) AS {quote('act_' + a)}" for a, col in c.actions.items()]
    else:  # bit i of the multi-hot, in arithmetic every engine has
        bits = f"CAST({log(c.action_bits)} AS DOUBLE)"
        cols += [f"CAST(CAST(FLOOR({bits} / {2 ** i}) AS BIGINT) % 2 AS INTEGER) AS {quote('act_' + a)}"
                 for i, a in enumerate(c.actions)]
    cols += [f"{log(col)} AS {quote('cat_' + n)}" for n, col in c.categoricals.items()]
    cols += [f"CAST({log(col)} AS DOUBLE) AS {quote(CONTEXT_PREFIX + n)}" for n, col in c.numeric.items()]
    cols += [f"CAST({log(col)} AS DOUBLE) AS {quote(DENSE_PREFIX + n)}" for n, col in c.dense.items()]
    cols += [f"CAST({log(col)} AS DOUBLE) AS {quote(TRUE_PROB_PREFIX + a)}" for a, col in c.true_probs.items()]
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
    """Table ``events``, stored in ``output_order`` with ``rid`` increasing in it; the read logs
    are dropped (at 100M rows they are gigabytes the engine would otherwise keep or spill)."""
    engine.create_numbered("events", events_sql(cfg, engine), output_order(cfg))
    for table in ("logs", "log_rows"):
        engine.drop_table(table)


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
    come out the same on every engine and run, by the log's own values (rows equal in all of these
    differ in no output column but the features, which ties share)."""
    columns = ["member", "t", "item", "position"] + [f"act_{a}" for a in cfg.columns.actions]
    columns += [f"cat_{n}" for n in cfg.columns.categoricals]
    return ", ".join(f"{quote(c)} NULLS LAST" for c in columns)


def largest_key_rows(engine, cfg: PrepareConfig) -> dict[tuple[str, ...], int]:
    """Per key set with trailing windows: the most impressions any one key has (0 if none); the
    other key sets compute the same either way (features.use_probes) and are not counted."""
    largest = {}
    for keys, features in key_sets(cfg).items():
        if windowed(features):
            columns = ", ".join(key_column(k) for k in keys)
            [(rows,)] = engine.fetch(f"SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM events "
                                     f"GROUP BY {columns}) c")
            largest[keys] = rows
    return largest


def describe(plan: KeySet, largest: dict[tuple[str, ...], int]) -> str:
    """How a key set is computed, for the progress lines."""
    where = "per chunk of whole members" if plan.per_chunk else "over the whole log"
    if plan.keys not in largest:
        return f"{where}; no trailing windows"
    windows = "probes" if plan.probes else "RANGE frames"
    return f"{where}; at most {largest[plan.keys]} impressions per key; trailing windows by {windows}"


def build_feature_tables(engine, cfg: PrepareConfig, progress: Progress) -> tuple[list[str], list[KeySet]]:
    """One table per key set computed over the whole log (feedsr/prepare/features.py), each
    computed and stored on its own, so that no query holds every feature of every impression at
    once; returns the tables and every key set's plan (the per-chunk ones run in
    ``featured_chunks``)."""
    largest = largest_key_rows(engine, cfg)
    plans = plan_key_sets(cfg, largest)
    for plan in plans:
        if plan.per_chunk:
            progress(f"{len(plan.features)} features keyed by {' x '.join(plan.keys)}: {describe(plan, largest)}")
    names = []
    for name, sql, plan in feature_tables(cfg, "events", plans):
        engine.create_table(name, sql)
        names.append(name)
        progress(f"computed {len(plan.features)} features keyed by {' x '.join(plan.keys)} "
                 f"({describe(plan, largest)})")
    return names, plans


def member_ranges(first: np.ndarray, last: np.ndarray, count: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Rid ranges [lo, hi] of whole members, each holding at least ``chunk_rows`` impressions but
    the last. ``first``/``last``/``count``: per member, its smallest and largest rid and its
    impressions (the events are stored by member, so a member's rids are contiguous)."""
    order = np.argsort(first, kind="stable")
    first, last, count = first[order], last[order], count[order]
    ranges, lo, rows = [], 0, 0
    for i in range(len(first)):
        rows += int(count[i])
        if rows >= chunk_rows or i == len(first) - 1:
            ranges.append((int(first[lo]), int(last[i])))
            lo, rows = i + 1, 0
    return ranges


def featured_chunks(engine, cfg: PrepareConfig, tables: list[str], plans: list[KeySet], end_second: int,
                    chunk_rows: int) -> Iterator[pa.Table]:
    """The events before ``end_second`` with their features, in ``output_order``, as tables of
    whole members of about ``chunk_rows`` impressions each (the per-chunk key sets computed
    here, over the chunk's events)."""
    end = end_second * cfg.time_unit()
    rows = engine.fetch(f"SELECT MIN(rid), MAX(rid), COUNT(*) FROM events WHERE t < {end} GROUP BY member")
    first, last, count = (np.array(c, dtype=np.int64) for c in zip(*rows)) if rows else ([], [], [])
    for rids in member_ranges(np.asarray(first), np.asarray(last), np.asarray(count), chunk_rows):
        parts = [engine.stream(sql, BATCH_ROWS).read_all()
                 for sql in range_queries(cfg, "events", tables, plans, rids, engine.dialect)]
        table = parts[0]
        for part in parts[1:]:
            if not part["rid"].equals(table["rid"]):  # one row per event in every feature table
                raise RuntimeError(f"feature table rows do not line up with the events in rids {rids}")
            for name in part.column_names[1:]:
                table = table.append_column(name, part[name])
        yield table.filter(pc.less(table["t"], end))


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
    for name in cfg.columns.dense:
        log[DENSE_PREFIX + name] = table[DENSE_PREFIX + name].to_numpy().astype(np.float32)
    for action in cfg.columns.true_probs:
        log[TRUE_PROB_PREFIX + action] = table[TRUE_PROB_PREFIX + action].to_numpy().astype(np.float32)
    return log


def prefetched(chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """``chunks`` with the next one fetched in a background thread while the caller works on the
    current one (the engine computes outside the GIL): at most two chunks in memory."""
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, chunks, None)
        while (chunk := ahead.result()) is not None:
            ahead = pool.submit(next, chunks, None)
            yield chunk


def write_splits(out: Path, chunks: Iterator[pa.Table], cfg: PrepareConfig, vocabs: dict[str, np.ndarray],
                 progress: Progress) -> dict[str, dict]:
    """Window every chunk into every split; return the splits' counts. The splits are written in
    parallel threads (Parquet encoding and compression run outside the GIL)."""
    writers = [SplitWriter(out, split, list(cfg.columns.actions), cfg.max_seq_len, cfg.rows_per_file)
               for split in cfg.split_list()]
    done = 0
    with ThreadPoolExecutor(len(writers)) as pool:
        for table in prefetched(chunks):
            log = to_log(table, cfg, vocabs)
            check_log(log)
            list(pool.map(lambda writer: writer.add(log), writers))  # noqa: B023 - used at once
            done += len(log["member_id"])
            progress(f"windowed {done} impressions")
        counts = list(pool.map(SplitWriter.close, writers))
    return {writer.split.name: c for writer, c in zip(writers, counts)}


def run(cfg, chunk_rows: int = CHUNK_ROWS, extra_meta: dict | None = None) -> dict:
    """Prepare the dataset of a composed config (DictConfig, dict or PrepareConfig); return its
    dataset.json. Raises PrepareError naming the key, file or column for bad config or input.
    ``chunk_rows``: impressions windowed at a time (the output does not depend on it);
    ``extra_meta``: more dataset.json entries (a generator's parameters)."""
    cfg = to_prepare_config(cfg)
    splits = cfg.split_list()
    out, progress = Path(cfg.out), Progress()
    try:
        claim(out)  # before any work: a new, empty or feedsr-made directory, never a user's files
    except DataError as e:
        raise PrepareError(f"out: {e}") from None
    engine = connect(cfg.engine)
    try:
        vocabs, counts, dropped = prepare(engine, cfg, out, chunk_rows, progress)
    finally:
        engine.close()
    vocab_values = {column: vocab.tolist() for column, vocab in vocabs.items()}
    write_vocabs(out, vocab_values)
    meta = dataset_meta(cfg, counts, vocab_values, dropped) | (extra_meta or {})
    write_dataset_meta(out, meta)
    progress(f"wrote {out / DATASET_META}")
    return meta


def prepare(engine, cfg: PrepareConfig, out: Path, chunk_rows: int, progress: Progress):
    """Steps 1-6 on the engine; returns (vocabularies, split counts, {duplicates_dropped,
    history_impressions})."""
    splits = cfg.split_list()
    total = check_logs(engine, cfg)
    log_types = engine.column_types(cfg.logs[0])
    for role, table in cfg.side_tables().items():
        on = SIDE_JOINS[role][1]
        column = getattr(cfg.columns, on)
        check_side_table(engine, role, table, (f"columns.{on}", column, log_types[column]))
    check_history(engine, cfg, splits[0].start)
    progress(f"checked {len(cfg.logs)} log file(s): {total} rows")
    duplicates, history = load_logs(engine, cfg, total)
    progress(f"dropped {duplicates} exact duplicate rows")
    if cfg.history.logs:
        progress(f"prepended {history} pre-window history impressions")
    build_events(engine, cfg)
    impressions = count_events(engine, cfg, splits[-1].end)
    if impressions == 0:
        raise PrepareError(f"{cfg.logs}: no impressions before the last split boundary "
                           f"{cfg.splits.boundaries[-1]} (splits.boundaries; time.unit '{cfg.time.unit}')")
    progress("built events (side tables joined)")
    vocabs = build_vocabs(engine, cfg, splits[0].end)
    sizes = {column: vocab_size(vocab) for column, vocab in vocabs.items()}
    progress(f"built vocabularies from the training window: {sizes}")
    tables, plans = build_feature_tables(engine, cfg, progress)
    progress(f"computed the point-in-time features of {impressions} impressions kept in tables "
             f"({len(cfg.features)} features in all)")
    chunks = featured_chunks(engine, cfg, tables, plans, splits[-1].end, chunk_rows)
    counts = write_splits(out, chunks, cfg, vocabs, progress)
    for name, split_counts in counts.items():
        progress(f"wrote {name}: {split_counts}")
    return vocabs, counts, {"duplicates_dropped": duplicates, "history_impressions": history}


def relative_to_out(source: str, out: str) -> str:
    """A source inside the dataset folder (a generator's log) relative to it, so that the same
    dataset made in two places has the same dataset.json; anything else as given."""
    path = Path(source)
    return str(path.relative_to(out)) if path.is_relative_to(out) else source


def dataset_meta(cfg: PrepareConfig, counts: dict, vocabs: dict, dropped: dict) -> dict:
    return {
        "source": cfg.name,
        "action_names": list(cfg.columns.actions),
        "categorical": cfg.categorical_names(),
        "context": cfg.context_names(),
        "dense": list(cfg.columns.dense),
        "true_probs": list(cfg.columns.true_probs),
        VOCAB_SIZES: {column: vocab_size(values) for column, values in vocabs.items()},
        "splits": counts,
        **dropped,
        "inputs": [relative_to_out(p, cfg.out) for p in
                   list(cfg.logs) + list(cfg.history.logs) + [t.path for t in cfg.side_tables().values()]],
        "time_unit": cfg.time.unit,
        "timezone": cfg.time.timezone,
        "max_seq_len": cfg.max_seq_len,
        "features": {f.name: f.kind for f in cfg.features},
    }
