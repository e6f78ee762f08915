"""Checking the inputs before anything reads them (on the engine, feedsr/prepare/engine.py).

Every check runs per file, so an error names the file and the column (and the config key that
named the column): a missing column, a wrong type, nulls in a key, actions other than 0/1,
timestamps whose range says the unit is wrong, a side table with duplicate keys.
"""

from __future__ import annotations

from datetime import datetime, timezone

from feedsr.prepare.config import TIME_UNITS, PrepareConfig, PrepareError, SideTableConfig

# Plausible impression times: a timestamp read in the configured unit must fall in these years,
# which is what tells seconds from milliseconds (1.6e9 s is 2020; 1.6e9 ms is January 1970).
PLAUSIBLE_YEARS = (1990, 2100)


def quote(name: str) -> str:
    """A SQL identifier, quoted (Spark is set to read double quotes as identifiers too)."""
    return '"' + name.replace('"', '""') + '"'


def is_integer(dtype: str) -> bool:
    return dtype.upper().rstrip("0123456789") in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
                                                  "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}


def is_key_type(dtype: str) -> bool:
    """Ids and categoricals: integers or strings (vocabularies map either to dense ids)."""
    return is_integer(dtype) or dtype.upper() == "VARCHAR"


def log_roles(cfg: PrepareConfig) -> list[tuple[str, str, str]]:
    """(config key, column, required kind) for every log column the config names."""
    c = cfg.columns
    roles = [("columns.member", c.member, "integer"), ("columns.item", c.item, "key"),
             ("columns.timestamp", c.timestamp, "integer")]
    if c.author is not None:
        roles.append(("columns.author", c.author, "key"))
    if c.position is not None:
        roles.append(("columns.position", c.position, "integer"))
    if c.action_bits is not None:
        roles.append(("columns.action_bits", c.action_bits, "integer"))
    roles += [(f"columns.actions.{a}", col, "action") for a, col in c.actions.items() if col is not None]
    roles += [(f"columns.categoricals.{n}", col, "key") for n, col in c.categoricals.items()]
    roles += [(f"columns.numeric.{n}", col, "numeric") for n, col in c.numeric.items()]
    roles += [(f"columns.dense.{n}", col, "numeric") for n, col in c.dense.items()]
    roles += [(f"columns.true_probs.{a}", col, "numeric") for a, col in c.true_probs.items()]
    return roles


KIND_CHECKS = {
    "integer": (is_integer, "an integer type"),
    "key": (is_key_type, "an integer or string type"),
    "action": (lambda t: is_integer(t) or t.upper() == "BOOLEAN", "0/1 integers or booleans"),
    "numeric": (lambda t: is_integer(t) or t.upper() in {"FLOAT", "DOUBLE", "REAL"}
                or t.upper().startswith("DECIMAL"), "a numeric type"),
}


def check_columns(path: str, types: dict[str, str], roles: list[tuple[str, str, str]]) -> None:
    """PrepareError naming the file, column and config key of the first missing or mistyped column."""
    for key, column, kind in roles:
        if column not in types:
            raise PrepareError(f"{path}: missing column '{column}' ({key}); it has {sorted(types)}")
        ok, expected = KIND_CHECKS[kind]
        if not ok(types[column]):
            raise PrepareError(f"{path}: column '{column}' ({key}) has type {types[column]}, expected {expected}")


def check_log_values(engine, path: str, cfg: PrepareConfig) -> int:
    """Nulls in keys, non-0/1 actions and the timestamp range, in one scan; returns the row count."""
    c = cfg.columns
    numbers = {**{col: f"columns.numeric.{n}" for n, col in c.numeric.items()},
               **{col: f"columns.dense.{n}" for n, col in c.dense.items()},
               **{col: f"columns.true_probs.{n}" for n, col in c.true_probs.items()}}
    roles = {c.member: "columns.member", c.item: "columns.item", c.timestamp: "columns.timestamp", **numbers}
    keys = list(roles)
    actions = [col for col in c.actions.values() if col is not None]
    exprs = ["count(*)", f"min({quote(c.timestamp)})", f"max({quote(c.timestamp)})"]
    exprs += [f"count(*) FILTER (WHERE {quote(k)} IS NULL)" for k in keys]
    # NaN and +-inf: above the largest double in DuckDB and in Spark SQL alike (both order NaN
    # above every number), so one comparison finds both.
    exprs += [f"count(*) FILTER (WHERE abs(CAST({quote(k)} AS DOUBLE)) > 1.7976931348623157e308)" for k in numbers]
    exprs += [f"count(*) FILTER (WHERE {not_0_or_1(a)})" for a in actions]
    if c.action_bits is not None:  # a multi-hot: no nulls, no negative values, no bit beyond the actions
        bits = quote(c.action_bits)
        exprs.append(f"count(*) FILTER (WHERE {bits} IS NULL OR {bits} < 0 OR {bits} >= {2 ** len(c.actions)})")
    [(rows, t_min, t_max, *bad)] = engine.fetch(f"SELECT {', '.join(exprs)} FROM {engine.source(path)}")
    for column, nulls in zip(keys, bad[: len(keys)]):
        if nulls:
            raise PrepareError(f"{path}: column '{column}' ({roles[column]}) has {nulls} null values; ids, "
                               "timestamps and numeric columns must be set on every row (a query source can fill them)")
    for column, count in zip(numbers, bad[len(keys):len(keys) + len(numbers)]):
        if count:
            raise PrepareError(f"{path}: column '{column}' ({roles[column]}) has {count} NaN or infinite values; "
                               "numeric columns must be finite")
    bad = bad[:len(keys)] + bad[len(keys) + len(numbers):]
    if c.action_bits is not None and bad[-1]:
        raise PrepareError(f"{path}: column '{c.action_bits}' (columns.action_bits) has {bad[-1]} values that are "
                           f"null or not a multi-hot of the {len(c.actions)} actions (0..{2 ** len(c.actions) - 1})")
    for (name, column), count in zip([(a, col) for a, col in c.actions.items() if col is not None], bad[len(keys):]):
        if count:
            raise PrepareError(f"{path}: column '{column}' (action '{name}') has {count} values that are "
                               f"not 0 or 1{_example(engine, path, column)}")
    if rows:
        check_time_range(path, c.timestamp, cfg.time.unit, t_min, t_max)
    return rows


def not_0_or_1(column: str) -> str:
    return f"{quote(column)} IS NULL OR CAST({quote(column)} AS BIGINT) NOT IN (0, 1)"  # integer or boolean


def _example(engine, path: str, column: str) -> str:
    [(value,)] = engine.fetch(f"SELECT {quote(column)} FROM {engine.source(path)} WHERE {not_0_or_1(column)} LIMIT 1")
    return f" (e.g. {value})"


def _year(raw: int, unit: str) -> float:
    return 1970 + raw / TIME_UNITS[unit] / (365.2425 * 86_400)


def check_time_range(path: str, column: str, unit: str, t_min: int, t_max: int) -> None:
    """PrepareError when the timestamps, read in ``unit``, fall outside ``PLAUSIBLE_YEARS``;
    names the unit that would fit."""
    lo, hi = PLAUSIBLE_YEARS
    if lo <= _year(t_min, unit) and _year(t_max, unit) < hi:
        return
    fits = [u for u in TIME_UNITS if lo <= _year(t_min, u) and _year(t_max, u) < hi]
    hint = f"; as '{fits[0]}' they would be" if fits else ""
    shown = lambda u: " .. ".join(_date(t, u) for t in (t_min, t_max))  # noqa: E731
    raise PrepareError(
        f"{path}: column '{column}' read as time.unit='{unit}' spans {shown(unit)}, outside "
        f"{lo}..{hi}{hint + ' ' + shown(fits[0]) if fits else ''}: set time.unit to the column's unit")


def _date(raw: int, unit: str) -> str:
    year = _year(raw, unit)
    if not 1 <= year < 9999:
        return f"year {year:.0f}"
    return datetime.fromtimestamp(raw / TIME_UNITS[unit], timezone.utc).strftime("%Y-%m-%d")


def check_logs(engine, cfg: PrepareConfig) -> int:
    """Check every log file; return their total row count."""
    total = 0
    for path in cfg.logs:
        check_columns(path, engine.column_types(path), log_roles(cfg))
        total += check_log_values(engine, path, cfg)
    return total


def side_roles(role: str, table: SideTableConfig) -> list[tuple[str, str, str]]:
    roles = [(f"{role}.key", table.key, "key")]
    roles += [(f"{role}.numeric", col, "numeric") for col in table.numeric]
    roles += [(f"{role}.categorical", col, "key") for col in table.categorical]
    if table.author is not None:
        roles.append((f"{role}.author", table.author, "key"))
    if table.created is not None:
        roles.append((f"{role}.created", table.created, "integer"))
    return roles


def check_side_table(engine, role: str, table: SideTableConfig,
                     log_column: tuple[str, str, str]) -> None:
    """Columns present and typed; keys of the log column's type family, set and unique (a join on
    a duplicated key would multiply impressions). ``log_column``: (config key, column, type)."""
    types = engine.column_types(table.path)
    check_columns(table.path, types, side_roles(role, table))
    log_key, log_name, log_type = log_column
    if is_integer(types[table.key]) != is_integer(log_type):
        raise PrepareError(f"{table.path}: key column '{table.key}' ({role}.key) has type {types[table.key]}, "
                           f"but the log's '{log_name}' ({log_key}) has type {log_type}: they cannot be joined")
    key = quote(table.key)
    source = engine.source(table.path)
    [(nulls,)] = engine.fetch(f"SELECT count(*) FROM {source} WHERE {key} IS NULL")
    dup = engine.fetch(f"SELECT {key} FROM {source} WHERE {key} IS NOT NULL GROUP BY {key} HAVING count(*) > 1 LIMIT 1")
    if nulls:
        raise PrepareError(f"{table.path}: key column '{table.key}' ({role}.key) has {nulls} null values")
    if dup:
        raise PrepareError(f"{table.path}: key column '{table.key}' ({role}.key) has duplicate values "
                           f"(e.g. {dup[0][0]}); a side table needs one row per key")


def check_history(engine, cfg: PrepareConfig, first_boundary: int) -> None:
    """History sources have the log's role columns, valid values, and only impressions before the
    first split boundary (``first_boundary``, epoch seconds)."""
    end = first_boundary * TIME_UNITS[cfg.time.unit]
    for path in cfg.history.logs:
        check_columns(path, engine.column_types(path), log_roles(cfg))
        check_log_values(engine, path, cfg)
        ts = quote(cfg.columns.timestamp)
        [(late, latest)] = engine.fetch(f"SELECT count(*) FILTER (WHERE {ts} >= {end}), max({ts}) "
                                        f"FROM {engine.source(path)}")
        if late:
            raise PrepareError(f"{path} (history.logs): {late} impressions at or after the first split "
                               f"boundary {cfg.splits.boundaries[0]} (latest {latest}): history must "
                               "come before it")
