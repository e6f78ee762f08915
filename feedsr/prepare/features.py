"""Point-in-time features compiled to DuckDB SQL window functions.

The rule every kind keeps: a feature of an impression at raw time t sees only events of its key
with a time t' < t. Windows order by the integer raw time ``t`` and end ``1 PRECEDING`` in a RANGE
frame, so events sharing a timestamp never see each other, whatever order they are stored in; a
trailing window of W seconds starts ``W * unit PRECEDING``, i.e. holds t - W <= t' < t.

One function per kind returns a ``Compiled``: the SQL expression, over the ``events`` table (see
feedsr/prepare/pipeline.py) plus the helper columns it needs computed in a first pass (window
functions cannot nest). An expression is NULL where it has no value; ``feature_sql`` then applies
log1p, fills NULL with the feature's ``fill`` and casts to FLOAT.

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

A key that is NULL on an impression (no author, an unknown categorical) gives the value of a key
without history: counts 0, rates the prior, the rest NULL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from feedsr.prepare.config import ENTITY_KEYS, TIME_UNITS, FeatureConfig, PrepareConfig, TimeConfig
from feedsr.prepare.sources import quote

TIME = quote("t")
SESSION = quote("session")
DAY_S = 86_400


@dataclass(frozen=True)
class Compiled:
    expr: str  # over events + helpers; NULL where the feature has no value
    helpers: dict[str, str] = field(default_factory=dict)  # column -> expression over events


def key_column(key: str) -> str:
    """The events column of a feature key: member, item, author, or ``cat_<name>``."""
    return quote(key if key in ENTITY_KEYS else f"cat_{key}")


def action_column(action: str) -> str:
    return quote(f"act_{action}")


def _partition(f: FeatureConfig) -> str:
    return ", ".join(key_column(k) for k in f.keys)


def _earlier(partition: str, window: int | None = None) -> str:
    """OVER clause: same partition, raw time strictly earlier (and >= t - window, in raw units)."""
    start = "UNBOUNDED PRECEDING" if window is None else f"{window} PRECEDING"
    return f"OVER (PARTITION BY {partition} ORDER BY {TIME} RANGE BETWEEN {start} AND 1 PRECEDING)"


def _count_and_hits(f: FeatureConfig, time: TimeConfig) -> tuple[str, str]:
    window = None if f.window_s is None else f.window_s * TIME_UNITS[time.unit]
    over = _earlier(_partition(f), window)
    hits = f"COALESCE(SUM({action_column(f.action)}) {over}, 0)" if f.action else "0"
    return f"COUNT(*) {over}", hits


def impressions(f: FeatureConfig, time: TimeConfig) -> Compiled:
    return Compiled(_count_and_hits(f, time)[0])


def action_count(f: FeatureConfig, time: TimeConfig) -> Compiled:
    return Compiled(_count_and_hits(f, time)[1])


def action_rate(f: FeatureConfig, time: TimeConfig) -> Compiled:
    count, hits = _count_and_hits(f, time)
    s, p = f.prior_strength, f.prior_rate
    return Compiled(f"(({hits}) + {s * p!r}) / (({count}) + {s!r})")


def last_k_mean(f: FeatureConfig, time: TimeConfig) -> Compiled:
    # A ROWS frame counts rows, not times, so it would let ties see each other. Only the first row
    # of a tie group (in a total order) has exactly the strictly earlier rows before it; every row
    # of the group takes that row's value.
    act = action_column(f.action)
    order = f"{TIME}, {quote('member')}, {quote('item')}, {act}, {quote('rid')}"
    rows = f"OVER (PARTITION BY {_partition(f)} ORDER BY {order} ROWS BETWEEN {f.k} PRECEDING AND 1 PRECEDING)"
    mean, first = f"h_{f.name}_mean", f"h_{f.name}_first"
    helpers = {
        mean: f"AVG({act}::DOUBLE) {rows}",
        first: f"ROW_NUMBER() OVER (PARTITION BY {_partition(f)} ORDER BY {order}) "
               f"= COUNT(*) {_earlier(_partition(f))} + 1",
    }
    expr = f"MAX(CASE WHEN {quote(first)} THEN {quote(mean)} END) OVER (PARTITION BY {_partition(f)}, {TIME})"
    return Compiled(expr, helpers)


def since_impression(f: FeatureConfig, time: TimeConfig) -> Compiled:
    return Compiled(f"({TIME} - MAX({TIME}) {_earlier(_partition(f))})::DOUBLE / {TIME_UNITS[time.unit]}")


def since_action(f: FeatureConfig, time: TimeConfig) -> Compiled:
    last = f"MAX(CASE WHEN {action_column(f.action)} = 1 THEN {TIME} END) {_earlier(_partition(f))}"
    return Compiled(f"({TIME} - {last})::DOUBLE / {TIME_UNITS[time.unit]}")


def item_age(f: FeatureConfig, time: TimeConfig) -> Compiled:
    # GREATEST skips NULLs, so an unknown creation time must stay NULL before it.
    created, day = quote("created"), TIME_UNITS[time.unit] * DAY_S
    return Compiled(f"CASE WHEN {created} IS NOT NULL THEN GREATEST({TIME} - {created}, 0)::DOUBLE / {day} END")


def session_impressions(f: FeatureConfig, time: TimeConfig) -> Compiled:
    return Compiled(f"COUNT(*) {_earlier(quote('member') + ', ' + SESSION)}")


def session_actions(f: FeatureConfig, time: TimeConfig) -> Compiled:
    over = _earlier(quote("member") + ", " + SESSION)
    return Compiled(f"COALESCE(SUM({action_column(f.action)}) {over}, 0)")


def _local_time(time: TimeConfig) -> str:
    """The impression's wall-clock time in time.timezone (DuckDB's ICU applies its DST rules)."""
    zone = "'" + time.timezone.replace("'", "''") + "'"
    return f"timezone({zone}, to_timestamp({TIME}::DOUBLE / {TIME_UNITS[time.unit]}))"


def hour_of_day(f: FeatureConfig, time: TimeConfig) -> Compiled:
    return Compiled(f"hour({_local_time(time)})")


def day_of_week(f: FeatureConfig, time: TimeConfig) -> Compiled:
    return Compiled(f"dayofweek({_local_time(time)})")


KINDS: dict[str, Callable[[FeatureConfig, TimeConfig], Compiled]] = {
    "impressions": impressions, "action_count": action_count, "action_rate": action_rate,
    "last_k_mean": last_k_mean, "since_impression": since_impression, "since_action": since_action,
    "item_age": item_age, "session_impressions": session_impressions, "session_actions": session_actions,
    "hour_of_day": hour_of_day, "day_of_week": day_of_week,
}


def no_history_value(f: FeatureConfig) -> str:
    """The value of a key without earlier events (what a NULL key gets)."""
    return {"impressions": "0", "action_count": "0", "action_rate": repr(f.prior_rate)}.get(f.kind, "NULL")


def compile_feature(f: FeatureConfig, time: TimeConfig) -> Compiled:
    """The feature as one FLOAT expression (log1p, NULL-key guard and fill applied)."""
    compiled = KINDS[f.kind](f, time)
    expr = compiled.expr
    if f.keys:
        null_key = " OR ".join(f"{key_column(k)} IS NULL" for k in f.keys)
        expr = f"CASE WHEN {null_key} THEN {no_history_value(f)} ELSE {expr} END"
    if f.log1p:
        expr = f"LN(1 + ({expr}))"
    return Compiled(f"COALESCE(({expr})::DOUBLE, {f.fill!r})::FLOAT", compiled.helpers)


def needs_sessions(cfg: PrepareConfig) -> bool:
    return any(f.kind.startswith("session_") for f in cfg.features)


def session_sql(gap_s: int, unit: int, source: str) -> str:
    """``source`` with a ``session`` column: per member, the number of gaps longer than ``gap_s``
    before the impression (ties share their session: the RANGE frame takes the whole tie group)."""
    member = quote("member")
    gap = f"CASE WHEN {TIME} - LAG({TIME}) OVER (PARTITION BY {member} ORDER BY {TIME}) > {gap_s * unit} THEN 1 ELSE 0 END"
    return (f"SELECT * EXCLUDE (new_session), SUM(new_session) OVER (PARTITION BY {member} ORDER BY {TIME} "
            f"RANGE UNBOUNDED PRECEDING) AS {SESSION} FROM (SELECT *, {gap} AS new_session FROM {source})")


def feature_sql(cfg: PrepareConfig, source: str) -> str:
    """A query over ``source`` (the events) adding one ``ctx_<name>`` column per feature."""
    compiled = {f.name: compile_feature(f, cfg.time) for f in cfg.features}
    helpers = {name: expr for c in compiled.values() for name, expr in c.helpers.items()}
    first = f"SELECT *{''.join(f', {e} AS {quote(n)}' for n, e in helpers.items())} FROM {source}"
    drop = f" EXCLUDE ({', '.join(map(quote, helpers))})" if helpers else ""
    columns = "".join(f", {c.expr} AS {quote('ctx_' + name)}" for name, c in compiled.items())
    return f"SELECT *{drop}{columns} FROM ({first})"
