"""Point-in-time features compiled to SQL window functions (DuckDB; the same SQL on Spark SQL).

The rule every kind keeps: a feature of an impression at raw time t sees only events of its key
with a time t' < t. Events sharing a timestamp never see each other, whatever order they are
stored in; a trailing window of W seconds holds t - W <= t' < t.

How the SQL is shaped, for speed (the first form, one window expression per feature over the
wide events table with RANGE frames, cost 0.1-0.4 s per 100k impressions each; see
docs/prepare.md):

1. Features are grouped by their key set K (member; item; member x author; ...; the session
   features by (member, session)). Per K, a narrow table ``g`` holds one row per (K, raw time):
   the impressions at that time and, per action used, how many had it. Rows whose key is NULL are
   left out (and so are pre-window history rows unless history.count_in_features).
2. Over ``g``, per K, one sorted pass (``group_ctes``): "strictly earlier" sums are running sums
   minus the current row (ROWS frames), previous times are running maxima, and trailing windows
   are RANGE frames up to the current row minus the row, or, for keys with many rows, differences
   of running sums read at probe rows placed at ``t - W`` (``use_probes``).
3. ``last_k_mean`` needs single impressions, not times: per feature, a narrow row-level query
   (ROWS frame over a total order), keeping the first row of each tie group, whose k preceding
   rows are exactly the k latest strictly earlier ones; joined onto K's rows.
4. ``key_set_sql``: the ``rid`` of the events joined with K's rows on (K, time), sorted by rid. A
   NULL key matches nothing; the outer expression gives such impressions the value of a key
   without history (counts 0, rates the prior, the rest NULL), then applies log1p, fills NULL
   with the feature's ``fill`` and casts to FLOAT.
5. Where it runs (``plan_key_sets``): a key set whose keys include the member is computed per
   output chunk, over a rid range of the events that holds whole members (``range_queries``),
   in memory; the others once over the whole log into a table ``feat<i>`` stored in rid order
   (``feature_tables``), of which ``range_queries`` reads the chunk's range.

Kinds (``FeatureConfig.kind``):

- ``impressions``, ``action_count``: earlier impressions of the key (with the action), in all
  history or the trailing window.
- ``action_rate``: (count + s * p) / (impressions + s), with p = ``prior_rate``, s =
  ``prior_strength``: p for a key without history, the plain rate after many impressions.
- ``last_k_mean``: the action's mean over the key's k latest earlier impressions (NULL if none).
  Earlier events sharing a time are ordered by (member, item, outcome), a fixed rule, so the
  result does not depend on storage order.
- ``since_impression``, ``since_action``: seconds from the key's latest earlier impression (with
  the action) to this one; NULL if none.
- ``item_age``: days from item_table.created to the impression, clipped at 0; NULL if unknown.
- ``session_impressions``, ``session_actions``: the member's earlier impressions (with the
  action) in the current session; a session ends after a gap of more than ``session_gap_s``.
- ``hour_of_day`` (0..23), ``day_of_week`` (0 = Sunday .. 6): the impression's own local time in
  ``time.timezone``, daylight saving included.

SQL that differs between engines (local time, casts of the row id) goes through ``Dialect``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from feedsr.prepare.config import ENTITY_KEYS, TIME_UNITS, FeatureConfig, PrepareConfig, TimeConfig
from feedsr.prepare.sources import quote

TIME = quote("t")
SESSION = "session"
SESSION_KEYS = ("member", SESSION)  # the key set of the session features
SESSION_KINDS = ("session_impressions", "session_actions")
DAY_S = 86_400
ALL = None  # window_s of "all earlier events"


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between DuckDB and Spark SQL."""

    name: str

    def local_time(self, t: str, unit: int, timezone: str) -> str:
        zone = "'" + timezone.replace("'", "''") + "'"
        if self.name == "spark":  # the session time zone is UTC (feedsr/prepare/engine.py)
            return f"from_utc_timestamp(timestamp_seconds(CAST({t} AS DOUBLE) / {unit}), {zone})"
        return f"timezone({zone}, to_timestamp(CAST({t} AS DOUBLE) / {unit}))"  # ICU applies DST

    def day_of_week(self, ts: str) -> str:
        return f"(dayofweek({ts}) - 1)" if self.name == "spark" else f"dayofweek({ts})"  # Spark: Sunday = 1


DUCKDB = Dialect("duckdb")
SPARK = Dialect("spark")


def key_column(key: str) -> str:
    """The events column of a feature key: member, item, author, session, or ``cat_<name>``."""
    return quote(key if key in ENTITY_KEYS or key == SESSION else f"cat_{key}")


def action_column(action: str) -> str:
    return quote(f"act_{action}")


def group_keys(f: FeatureConfig) -> tuple[str, ...]:
    """The key set a feature is computed over (one table per distinct set; () for none)."""
    if f.kind in SESSION_KINDS:
        return SESSION_KEYS
    return tuple(sorted(f.keys))


# ------------------------------------------------------------------ per-kind expressions over g


def earlier(column: str, window: int | None) -> str:
    """The ``w`` column (see ``group_sql``) holding the sum of ``column`` (``n``: impressions, or
    ``h_<action>``: hits) over the key's strictly earlier times, all or in the trailing window."""
    return quote(f"e_{column}" if window is None else f"e_{column}_{window}")


def previous_time(action: str | None = None) -> str:
    """The ``c`` column with the key's latest earlier time (with the action)."""
    return quote("prev_t" if action is None else f"prev_t_{action}")


def _window(f: FeatureConfig, time: TimeConfig) -> int | None:
    return None if f.window_s is None else f.window_s * TIME_UNITS[time.unit]


def _seconds(raw: str, time: TimeConfig) -> str:
    return f"CAST({raw} AS DOUBLE) / {TIME_UNITS[time.unit]}"


def sums_needed(f: FeatureConfig, time: TimeConfig) -> list[tuple[str, int | None]]:
    """The (column, window) sums a feature reads."""
    window = _window(f, time)
    if f.kind in ("impressions", "session_impressions"):
        return [("n", window)]
    if f.kind in ("action_count", "session_actions"):
        return [(f"h_{f.action}", window)]
    if f.kind == "action_rate":
        return [("n", window), (f"h_{f.action}", window)]
    return []


def impressions(f: FeatureConfig, time: TimeConfig) -> str:
    return earlier("n", _window(f, time))


def action_count(f: FeatureConfig, time: TimeConfig) -> str:
    return earlier(f"h_{f.action}", _window(f, time))


def action_rate(f: FeatureConfig, time: TimeConfig) -> str:
    s, p = f.prior_strength, f.prior_rate
    return f"({action_count(f, time)} + {s * p!r}) / ({impressions(f, time)} + {s!r})"


def since_impression(f: FeatureConfig, time: TimeConfig) -> str:
    return _seconds(f"{TIME} - {previous_time()}", time)


def since_action(f: FeatureConfig, time: TimeConfig) -> str:
    return _seconds(f"{TIME} - {previous_time(f.action)}", time)


GROUPED: dict[str, Callable[[FeatureConfig, TimeConfig], str]] = {
    "impressions": impressions, "action_count": action_count, "action_rate": action_rate,
    "since_impression": since_impression, "since_action": since_action,
    "session_impressions": impressions, "session_actions": action_count,
}


# ------------------------------------------------------------------ kinds without a key


def item_age(f: FeatureConfig, time: TimeConfig, dialect: Dialect) -> str:
    # GREATEST skips NULLs, so an unknown creation time must stay NULL before it.
    created, day = "e." + quote("created"), TIME_UNITS[time.unit] * DAY_S
    return f"CASE WHEN {created} IS NOT NULL THEN CAST(GREATEST(e.{TIME} - {created}, 0) AS DOUBLE) / {day} END"


def hour_of_day(f: FeatureConfig, time: TimeConfig, dialect: Dialect) -> str:
    return f"hour({dialect.local_time('e.' + TIME, TIME_UNITS[time.unit], time.timezone)})"


def day_of_week(f: FeatureConfig, time: TimeConfig, dialect: Dialect) -> str:
    return dialect.day_of_week(dialect.local_time("e." + TIME, TIME_UNITS[time.unit], time.timezone))


ROW_LEVEL: dict[str, Callable[[FeatureConfig, TimeConfig, Dialect], str]] = {
    "item_age": item_age, "hour_of_day": hour_of_day, "day_of_week": day_of_week,
}


# ------------------------------------------------------------------ the query


def _columns(keys: tuple[str, ...], alias: str = "") -> list[str]:
    return [alias + key_column(k) for k in keys]


def _not_null(keys: tuple[str, ...]) -> str:
    return " AND ".join(f"{c} IS NOT NULL" for c in _columns(keys))


def last_k_sql(f: FeatureConfig, keys: tuple[str, ...], source: str, counted: str) -> str:
    """(K, t, value) for every key and time: the action's mean over the k rows before the first
    row of the time's tie group in a total order; a ROWS frame counts rows, not times, so only
    that first row has exactly the strictly earlier rows before it."""
    part, act = ", ".join(_columns(keys)), action_column(f.action)
    order = f"{TIME}, {quote('member')}, {quote('item')}, {act}, {quote('rid')}"
    over = f"PARTITION BY {part} ORDER BY {order}"
    return (f"SELECT {part}, {TIME}, v FROM (SELECT {part}, {TIME}, "
            f"AVG(CAST({act} AS DOUBLE)) OVER ({over} ROWS BETWEEN {f.k} PRECEDING AND 1 PRECEDING) AS v, "
            f"LAG({TIME}) OVER ({over}) AS prev_t FROM {source} WHERE {_not_null(keys)}{counted}) "
            f"WHERE prev_t IS NULL OR prev_t <> {TIME}")


def group_ctes(i: int, keys: tuple[str, ...], features: list[FeatureConfig], time: TimeConfig,
               source: str, counted: str = "", probes: bool = True) -> list[tuple[str, str]]:
    """The CTEs (name, query) of key set K, ending with ``w<i>``: one row per (K, t) with a
    ``f_<name>`` column per feature.

    - ``g<i>``: per (K, t), the impressions ``n`` and each used action's hits ``h_<action>``.
    - ``r<i>``: one sorted pass over the ``g`` rows ("data") and, per trailing window W, a probe
      row at ``t - W`` for each of them (zero counts; a probe sorts before a data row of the same
      time). Running sums (ROWS frames) then give, on a data row, the sums up to and including
      its time, and on a probe, the sums strictly before ``t - W``; running maxima of the data
      rows' times give the previous times (with an action).
    - ``p<i>``: the data row and its probes pivoted back to one row per (K, t): earlier sums are
      (running sum - own count), windowed ones minus the probe's sum.
    - ``w<i>``: the features, with the last-k means joined on.

    Probes need only ROWS frames, sorts and GROUP BYs: engines evaluate ``RANGE BETWEEN W
    PRECEDING`` frames far slower on big partitions (a tab, a tag: DuckDB 2.0 scans the frame).
    On small partitions (a member, an item: ``probes=False``, chosen by ``use_probes``) a RANGE
    frame over the ``g`` rows is cheaper than sorting (1 + windows) times the rows: then ``r<i>``
    has no probe rows and takes the window sums from RANGE frames, and ``p<i>`` needs no pivot.
    Both give the same values.
    """
    part = ", ".join(_columns(keys))
    actions = sorted({f.action for f in features if f.action and f.kind != "last_k_mean"})
    counts = ["n"] + [f"h_{a}" for a in actions]
    hits = "".join(f", SUM(CAST({action_column(a)} AS DOUBLE)) AS {quote('h_' + a)}" for a in actions)
    g = (f"SELECT {part}, {TIME}, CAST(COUNT(*) AS DOUBLE) AS n{hits} FROM {source} "
         f"WHERE {_not_null(keys)}{counted} GROUP BY {part}, {TIME}")
    needed = sorted({s for f in features for s in sums_needed(f, time)}, key=lambda s: (s[0], s[1] or 0))
    summed = sorted({x for x, _ in needed})
    windows = sorted({w for _, w in needed if w is not None})
    probes = probes and bool(windows)
    union = (f"SELECT {part}, {TIME} AS probe_t, 1 AS is_data, {TIME} AS own_t, -1 AS wid"
             f"{''.join(', ' + quote(x) for x in counts)} FROM g{i}")
    zeros = "".join(f", 0.0 AS {quote(x)}" for x in counts)
    for j, w in enumerate(windows if probes else []):
        union += f" UNION ALL SELECT {part}, {TIME} - {w}, 0, {TIME}, {j}{zeros} FROM g{i}"
    order = f"PARTITION BY {part} ORDER BY probe_t" + (", is_data" if probes else "")
    running = [f"SUM({quote(x)}) OVER ({order} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) "
               f"AS {quote('s_' + x)}" for x in summed]
    if not probes:
        # One row per time, so the frame up to CURRENT ROW minus the row itself is exactly
        # t - W <= t' < t (DuckDB evaluates "... AND 1 PRECEDING" several times slower).
        running += [f"SUM({quote(x)}) OVER ({order} RANGE BETWEEN {w} PRECEDING AND CURRENT ROW) - {quote(x)} "
                    f"AS {earlier(x, w)}" for x, w in needed if w is not None]
    previous = {}  # pivot column -> which data rows' times it takes the latest earlier of
    if any(f.kind == "since_impression" for f in features):
        previous[previous_time()] = "is_data = 1"
    for a in sorted({f.action for f in features if f.kind == "since_action"}):
        previous[previous_time(a)] = f"is_data = 1 AND {quote('h_' + a)} > 0"
    running += [f"MAX(CASE WHEN {cond} THEN probe_t END) OVER ({order} ROWS BETWEEN UNBOUNDED PRECEDING "
                f"AND 1 PRECEDING) AS {name}" for name, cond in previous.items()]
    r = f"SELECT {', '.join([part, 'own_t', 'wid', *map(quote, counts), *running])} FROM ({union}) u"
    w_cte = (f"w{i}", features_sql(i, keys, features, time, source, counted))
    if not probes:
        columns = [f"{quote('s_' + x)} - {quote(x)} AS {earlier(x, None)}" for x in summed]
        columns += [earlier(x, window) for x, window in needed if window is not None] + list(previous)
        p = f"SELECT {', '.join([part, f'own_t AS {TIME}', *columns])} FROM r{i}"
        return [(f"g{i}", g), (f"r{i}", r), (f"p{i}", p), w_cte]
    before = {x: f"MAX(CASE WHEN wid = -1 THEN {quote('s_' + x)} - {quote(x)} END)" for x in summed}
    pivot = [f"{before[x]} AS {earlier(x, None)}" for x in summed]
    pivot += [f"{before[x]} - MAX(CASE WHEN wid = {windows.index(w)} THEN {quote('s_' + x)} END) "
              f"AS {earlier(x, w)}" for x, w in needed if w is not None]
    pivot += [f"MAX(CASE WHEN wid = -1 THEN {name} END) AS {name}" for name in previous]
    p = f"SELECT {', '.join([part, f'own_t AS {TIME}', *pivot])} FROM r{i} GROUP BY {part}, own_t"
    return [(f"g{i}", g), (f"r{i}", r), (f"p{i}", p), w_cte]


def features_sql(i: int, keys: tuple[str, ...], features: list[FeatureConfig], time: TimeConfig, source: str,
                 counted: str) -> str:
    """``w<i>``: per (K, t), a ``f_<name>`` column per feature, from ``p<i>`` and the last-k means."""
    part = ", ".join(_columns(keys))
    f_cols = [f"{GROUPED[f.kind](f, time)} AS {quote('f_' + f.name)}" for f in features if f.kind in GROUPED]
    w = f"SELECT {part}, {TIME}{''.join(', ' + c for c in f_cols)} FROM p{i}"
    for f in (f for f in features if f.kind == "last_k_mean"):
        on = " AND ".join(f"w.{c} = l.{c}" for c in _columns(keys) + [TIME])
        w = (f"SELECT w.*, l.v AS {quote('f_' + f.name)} FROM ({w}) w "
             f"LEFT JOIN ({last_k_sql(f, keys, source, counted)}) l ON {on}")
    return w


def no_history_value(f: FeatureConfig) -> str:
    """The value of a key without earlier events (what a NULL key gets)."""
    return {"impressions": "0", "action_count": "0", "action_rate": repr(f.prior_rate)}.get(f.kind, "NULL")


def finish(f: FeatureConfig, expr: str) -> str:
    """The NULL-key guard, log1p, the fill, and FLOAT."""
    if f.keys:
        null_key = " OR ".join(f"{c} IS NULL" for c in _columns(tuple(f.keys), "e."))
        expr = f"CASE WHEN {null_key} THEN {no_history_value(f)} ELSE {expr} END"
    if f.log1p:
        expr = f"LN(1 + ({expr}))"
    return f"CAST(COALESCE(CAST(({expr}) AS DOUBLE), {f.fill!r}) AS FLOAT)"


def key_sets(cfg: PrepareConfig) -> dict[tuple[str, ...], list[FeatureConfig]]:
    """The features computed per key set (all but the row-level kinds), in config order."""
    groups: dict[tuple[str, ...], list[FeatureConfig]] = {}
    for f in cfg.features:
        if f.kind not in ROW_LEVEL:
            groups.setdefault(group_keys(f), []).append(f)
    return groups


# Largest rows per key for which trailing windows use RANGE frames rather than probes (see
# group_ctes). Probes cost a sort of (1 + windows) times the rows; DuckDB's RANGE frames cost more
# as the frames grow (a 7-day window over a partition of 250k rows: ~2 s per 1M rows, against
# ~0.3 s for a 1-hour one). On the bench_prepare log at 1M impressions RANGE frames were faster
# up to 14k rows per key and as fast at 24k-67k (docs/prepare.md).
RANGE_MAX_KEY_ROWS = 100_000


def use_probes(largest_key_rows: int, method: str) -> bool:
    """Whether a key set's trailing windows use probes: ``method`` (engine.window_method) auto,
    range or probe; auto decides by the key set's largest number of rows per key."""
    return method == "probe" or (method == "auto" and largest_key_rows > RANGE_MAX_KEY_ROWS)


@dataclass(frozen=True)
class KeySet:
    """The features of one key set and how they are computed: ``probes`` for trailing windows
    (``use_probes``); ``per_chunk`` when the keys include the member (``member_local``)."""

    index: int
    keys: tuple[str, ...]
    features: list[FeatureConfig]
    probes: bool
    per_chunk: bool


def member_local(keys: tuple[str, ...]) -> bool:
    """Whether every event of a key is one member's (member, member x author, member x session,
    ...): output chunks hold whole members, so such features are computed chunk by chunk over the
    chunk's events, in memory, instead of over the whole log (sorts that spill at 100M rows)."""
    return "member" in keys


def plan_key_sets(cfg: PrepareConfig, largest: dict[tuple[str, ...], int] | None = None) -> list[KeySet]:
    """Every key set with its features and methods. ``largest``: per key set with trailing
    windows, its largest number of rows per key (``use_probes``); None: probes everywhere."""
    plans = []
    for i, (keys, features) in enumerate(key_sets(cfg).items()):
        probes = largest is None or use_probes(largest.get(keys, 0), cfg.engine.window_method)
        plans.append(KeySet(i, keys, features, probes, member_local(keys)))
    return plans


def windowed(features: list[FeatureConfig]) -> bool:
    """Whether any feature has a trailing window (only then do probes and RANGE frames differ)."""
    return any(f.window_s is not None for f in features)


def key_set_sql(cfg: PrepareConfig, plan: KeySet, source: str) -> str:
    """The query of one key set: ``rid`` and the finished ``ctx_<name>`` columns of every
    impression of ``source`` (the events, or a rid range of them), sorted by rid."""
    # History rows (history.logs) count for nobody unless history.count_in_features, and get the fill.
    counted = "" if cfg.history.count_in_features else f" AND {quote('history')} = 0"
    i, keys, features = plan.index, plan.keys, plan.features
    ctes = group_ctes(i, keys, features, cfg.time, source, counted, plan.probes)
    with_ = "WITH " + ", ".join(f"{name} AS ({sql})" for name, sql in ctes)
    narrow = f"SELECT rid, {quote('history')}, {', '.join(_columns(keys))}, {TIME} FROM {source}"
    on = " AND ".join(f"e.{c} = w{i}.{c}" for c in _columns(keys) + [TIME])
    columns = [f"{finish(f, f'w{i}.' + quote('f_' + f.name))}" for f in features]
    if counted:
        columns = [f"CASE WHEN e.{quote('history')} = 1 THEN CAST({f.fill!r} AS FLOAT) ELSE {c} END"
                   for f, c in zip(features, columns)]
    columns = [f"{c} AS {quote('ctx_' + f.name)}" for f, c in zip(features, columns)]
    return f"{with_} SELECT e.rid, {', '.join(columns)} FROM ({narrow}) e LEFT JOIN w{i} ON {on} ORDER BY e.rid"


def feature_tables(cfg: PrepareConfig, source: str, plans: list[KeySet]) -> list[tuple[str, str, KeySet]]:
    """Per key set computed over the whole log (not ``per_chunk``): (table name ``feat<i>``, its
    query, its plan). The table holds ``rid`` and the ``ctx_`` columns of every impression of
    ``source`` (the events), sorted by rid, so that a range of rids reads a range of the table."""
    return [(f"feat{p.index}", key_set_sql(cfg, p, source), p) for p in plans if not p.per_chunk]


def range_queries(cfg: PrepareConfig, source: str, tables: list[str], plans: list[KeySet],
                  rids: tuple[int, int], dialect: Dialect = DUCKDB) -> list[str]:
    """The queries whose results, side by side, are the events of ``source`` with ``rids[0] <=
    rid <= rids[1]`` and every feature, each sorted by rid: the events with the row-level
    features, each feature table, then each per-chunk key set computed over the range (which
    holds whole members). Every event has one row in each, so the results line up row for row
    and need no join (feature tables are stored in rid order, so each query reads only its range)."""
    in_range = f"rid BETWEEN {rids[0]} AND {rids[1]}"
    row_level = [f"{finish(f, ROW_LEVEL[f.kind](f, cfg.time, dialect))} AS {quote('ctx_' + f.name)}"
                 for f in cfg.features if f.kind in ROW_LEVEL]
    queries = [f"SELECT e.*{''.join(', ' + c for c in row_level)} FROM {source} e WHERE e.{in_range} ORDER BY e.rid"]
    queries += [f"SELECT * FROM {t} WHERE {in_range} ORDER BY rid" for t in tables]
    chunk = f"SELECT * FROM {source} WHERE {in_range}"
    # Sessions are a member's too: numbered per chunk, where the session key set needs them.
    sessions = f"({session_sql(cfg.session_gap_s, cfg.time_unit(), f'({chunk})')}) src"
    return queries + [key_set_sql(cfg, p, sessions if SESSION in p.keys else f"({chunk}) src")
                      for p in plans if p.per_chunk]


def session_sql(gap_s: int, unit: int, source: str) -> str:
    """``source`` with a ``session`` column: per member, the number of gaps longer than ``gap_s``
    before the impression (ties share their session: the RANGE frame takes the whole tie group)."""
    member = quote("member")
    gap = (f"CASE WHEN {TIME} - LAG({TIME}) OVER (PARTITION BY {member} ORDER BY {TIME}) > {gap_s * unit} "
           f"THEN 1 ELSE 0 END")
    return (f"SELECT s.*, SUM(new_session) OVER (PARTITION BY {member} ORDER BY {TIME} "
            f"RANGE UNBOUNDED PRECEDING) AS {SESSION} FROM (SELECT x.*, {gap} AS new_session FROM {source} x) s")
