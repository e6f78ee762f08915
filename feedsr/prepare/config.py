"""The prepare config (``conf/prepare.yaml`` + ``conf/prepare/*.yaml``): which log columns play
which role, the side tables, the point-in-time features, the splits and the engine.

Every dataclass checks its own values in ``__post_init__`` (ValueError naming the key and the
value); ``PrepareConfig`` checks what spans them (a feature's keys and action must exist).
``to_prepare_config`` merges a composed Hydra config into these dataclasses, so an unknown key or a
wrong type fails at start with the full key named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from feedsr.data.block import DEFAULT_SESSION_GAP_S
from feedsr.data.schema import MAX_ACTIONS
from feedsr.data.sequences import Split

# Raw time units per second. The output's timestamps are whole seconds; features compare the raw
# integers, so events one millisecond apart in an ms log are not ties.
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000}
ENTITY_KEYS = ("member", "item", "author")  # key names besides the categoricals' own names


class PrepareError(ValueError):
    """A config or an input that cannot be prepared; the message names the key, file or column."""


def require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {rule}, got {value!r}")


@dataclass
class ColumnsConfig:
    """Log column per role. ``actions`` maps action name -> 0/1 (or boolean) column, in bit order
    of ``action_bits``; ``categoricals`` maps name -> column (written as ``cat_<name>``)."""

    member: str = "member_id"  # integer
    item: str = "item_id"  # integer or string: it gets a dense vocabulary
    timestamp: str = "timestamp"  # integer, in time.unit
    author: str | None = None  # integer or string; or item_table.author
    position: str | None = None  # integer feed position, 0 = top; null: unknown (-1)
    actions: dict[str, str | None] = field(default_factory=dict)
    # One integer column holding every action as a multi-hot (bit i = the i-th of ``actions``, whose
    # columns are then null), instead of one 0/1 column per action.
    action_bits: str | None = None
    categoricals: dict[str, str] = field(default_factory=dict)
    # Per-impression numbers the log already holds, valued as of the impression (a content score,
    # an observed quality): name -> numeric column, written as ``ctx_<name>`` unchanged.
    numeric: dict[str, str] = field(default_factory=dict)
    # Per-impression numbers that describe the post itself (a content embedding, one column per
    # dimension): name -> numeric column, written as ``dense_<name>``; they enter the post token,
    # and so the history, where ``ctx_`` numbers are fused late, for the candidate only.
    dense: dict[str, str] = field(default_factory=dict)
    # The true probability of each action where it is known (synthetic logs: the oracle):
    # action -> numeric column, written as ``true_<action>``.
    true_probs: dict[str, str] = field(default_factory=dict)


@dataclass
class TimeConfig:
    unit: str = "s"  # s | ms | us: what the timestamp column counts since the epoch
    timezone: str = "UTC"  # IANA name: reads split dates, and the local time of calendar features

    def __post_init__(self):
        require(self.unit in TIME_UNITS, "time.unit", self.unit, f"one of {list(TIME_UNITS)}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"time.timezone must be an IANA time zone name, got {self.timezone!r}") from None


@dataclass
class SideTableConfig:
    """A table keyed by item or member id: static attributes joined onto every impression.

    ``numeric`` columns become ``ctx_<column>``, ``categorical`` ones ``cat_<column>`` (dense ids).
    On the item table, ``author`` gives each item's author and ``created`` its creation time (in
    time.unit, for the ``item_age`` feature).
    """

    path: str = MISSING  # a file, or a DuckDB query (SELECT/WITH/FROM ...) computing columns
    key: str = MISSING
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    author: str | None = None
    created: str | None = None
    fill: float = 0.0  # a numeric attribute of a key absent from the table (or null in it)


@dataclass
class HistoryConfig:
    """Pre-window histories: impressions from before the log (e.g. a member's last watched items,
    kept in another table) prepended to members' sequences. Sources are files or queries with the
    log's role columns (columns.*; a query can build them from lists); every row must be before
    the first split boundary, so it is history and never a target. Members without log
    impressions are dropped (no target, no row)."""

    logs: list[str] = field(default_factory=list)
    # Whether history impressions count in the point-in-time features. Off by default: a history
    # list is usually a biased sample (e.g. watched items only, all "clicked"), which would skew
    # rates; off, history impressions get each feature's fill and count for nobody.
    count_in_features: bool = False


FEATURE_KINDS = (
    "impressions",  # earlier impressions of the key
    "action_count",  # earlier impressions of the key with the action
    "action_rate",  # (count + prior_strength * prior_rate) / (impressions + prior_strength)
    "last_k_mean",  # mean of the action over the key's k latest earlier impressions
    "since_impression",  # seconds since the key's latest earlier impression
    "since_action",  # seconds since the key's latest earlier impression with the action
    "item_age",  # days since item_table.created
    "session_impressions",  # the member's earlier impressions in the current session
    "session_actions",  # ... of them with the action
    "hour_of_day",  # local hour of the impression in time.timezone, 0..23
    "day_of_week",  # local weekday, 0 = Sunday .. 6
)
NEEDS_ACTION = {"action_count", "action_rate", "last_k_mean", "since_action", "session_actions"}
NEEDS_KEYS = {"impressions", "action_count", "action_rate", "last_k_mean", "since_impression",
              "since_action"}
WINDOWED = {"impressions", "action_count", "action_rate"}


@dataclass
class FeatureConfig:
    """One point-in-time feature, written as ``ctx_<name>``; every kind counts only events of the
    same key with a strictly smaller raw timestamp (see feedsr/prepare/features.py)."""

    name: str = MISSING
    kind: str = MISSING
    keys: list[str] = field(default_factory=list)  # member, item, author, categorical names
    action: str | None = None
    window_s: int | None = None  # trailing window: events at t - window_s <= t' < t; null: all
    k: int = 10  # last_k_mean
    prior_rate: float = 0.0  # action_rate smoothing: the rate of a key with no history
    prior_strength: float = 1.0  # ... and how many impressions that prior weighs
    log1p: bool = False
    fill: float = -1.0  # no value: no earlier (action) event, no last-k history, unknown age

    def __post_init__(self):
        key = f"features.{self.name}"
        require(self.kind in FEATURE_KINDS, f"{key}.kind", self.kind, f"one of {list(FEATURE_KINDS)}")
        require((self.action is not None) == (self.kind in NEEDS_ACTION), f"{key}.action", self.action,
                "set for " + ", ".join(sorted(NEEDS_ACTION)) + " and null otherwise")
        require(bool(self.keys) == (self.kind in NEEDS_KEYS), f"{key}.keys", list(self.keys),
                "non-empty for " + ", ".join(sorted(NEEDS_KEYS)) + " and empty otherwise")
        require(len(set(self.keys)) == len(self.keys), f"{key}.keys", list(self.keys), "distinct")
        require(self.window_s is None or (self.kind in WINDOWED and self.window_s >= 1),
                f"{key}.window_s", self.window_s, "null, or >= 1 for " + ", ".join(sorted(WINDOWED)))
        require(self.k >= 1, f"{key}.k", self.k, ">= 1")
        require(0.0 <= self.prior_rate <= 1.0, f"{key}.prior_rate", self.prior_rate, "in [0, 1]")
        require(self.prior_strength > 0, f"{key}.prior_strength", self.prior_strength, "> 0")


@dataclass
class SplitsConfig:
    """Temporal splits: split i holds the impressions with boundaries[i] <= time < boundaries[i+1].

    A boundary is epoch seconds or an ISO date/datetime read in time.timezone. Impressions before
    the first boundary are history (and count in features); those after the last are left out.
    The first split is the training window: vocabularies come from it and what precedes it.
    """

    names: list[str] = field(default_factory=lambda: ["train", "valid", "test"])
    boundaries: list[str] = MISSING

    def check(self) -> None:
        """Called by PrepareConfig: the defaults (boundaries missing) must construct."""
        require(len(self.boundaries) == len(self.names) + 1, "splits.boundaries", list(self.boundaries),
                f"{len(self.names) + 1} values (one more than splits.names {list(self.names)})")
        require(len(set(self.names)) == len(self.names) and all(self.names), "splits.names",
                list(self.names), "distinct, non-empty names")


ENGINE_NAMES = ("duckdb", "spark")


@dataclass
class EngineConfig:
    """Where the SQL runs (feedsr/prepare/engine.py). ``engine=spark`` on the command line picks
    Spark (conf/engine/spark.yaml)."""

    name: str = "duckdb"  # duckdb | spark
    memory_limit: str = "4GB"  # DuckDB spills to temp_directory beyond it; Spark: the driver's memory
    threads: int | None = None  # null: every core
    temp_directory: str | None = None  # spill / scratch folder; null: DuckDB's default, the system's temp
    spark_master: str | None = None  # null: local[threads]; e.g. yarn or spark://host:7077
    spark_conf: dict[str, str] = field(default_factory=dict)  # extra Spark settings
    # Trailing windows: RANGE frames (fast on small partitions) or probes (any partition size);
    # auto picks per key set by its largest rows per key (feedsr/prepare/features.py). Same values.
    window_method: str = "auto"  # auto | range | probe

    def __post_init__(self):
        require(self.name in ENGINE_NAMES, "engine.name", self.name, f"one of {list(ENGINE_NAMES)}")
        require(self.window_method in ("auto", "range", "probe"), "engine.window_method", self.window_method,
                "one of ['auto', 'range', 'probe']")
        require(re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", self.memory_limit) is not None, "engine.memory_limit",
                self.memory_limit, "a size such as 512MB or 8GB")
        require(self.threads is None or self.threads >= 1, "engine.threads", self.threads, ">= 1 or null")


@dataclass
class PrepareConfig:
    name: str = "custom"  # dataset.json "source"
    logs: list[str] = MISSING  # Parquet or CSV paths (globs allowed) or DuckDB queries, same columns
    out: str = MISSING
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    time: TimeConfig = field(default_factory=TimeConfig)
    item_table: SideTableConfig | None = None
    member_table: SideTableConfig | None = None
    history: HistoryConfig = field(default_factory=HistoryConfig)
    features: list[FeatureConfig] = field(default_factory=list)
    session_gap_s: int = DEFAULT_SESSION_GAP_S  # a gap longer than this starts a new session
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    max_seq_len: int = 256
    rows_per_file: int = 8192
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        require(len(self.logs) >= 1, "logs", list(self.logs), "at least one path")
        require(1 <= len(self.columns.actions) <= MAX_ACTIONS, "columns.actions", dict(self.columns.actions),
                f"1..{MAX_ACTIONS} entries (action name: 0/1 column)")
        self.splits.check()
        self.split_list()  # boundaries parse and increase
        for name in ("max_seq_len", "rows_per_file", "session_gap_s"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.author_source() != "both", "columns.author", self.columns.author,
                "null when item_table.author gives the authors")
        if self.member_table is not None:
            require(self.member_table.author is None and self.member_table.created is None,
                    "member_table.author/created", (self.member_table.author, self.member_table.created),
                    "null (authors and creation times are item attributes)")
        self._check_names()
        c = self.columns
        require(all((col is None) == (c.action_bits is not None) for col in c.actions.values()), "columns.actions",
                dict(c.actions), "a 0/1 column per action, or all null with columns.action_bits naming the "
                "multi-hot column")
        require(set(self.columns.true_probs) <= set(self.columns.actions), "columns.true_probs",
                dict(self.columns.true_probs), f"keyed by actions of columns.actions {list(self.columns.actions)}")
        for f in self.features:
            self._check_feature(f)

    def author_source(self) -> str | None:
        """Where author ids come from: "log", "item_table", None (unknown), or "both" (an error)."""
        in_log = self.columns.author is not None
        in_items = self.item_table is not None and self.item_table.author is not None
        return {(True, True): "both", (True, False): "log", (False, True): "item_table"}.get(
            (in_log, in_items))

    def categorical_names(self) -> list[str]:
        """Every ``cat_`` name: the log's categoricals, then the item and member tables'."""
        return list(self.columns.categoricals) + [c for t in self.side_tables().values() for c in t.categorical]

    def context_names(self) -> list[str]:
        """Every ``ctx_`` name: the log's numeric columns, the side tables', then the features."""
        return (list(self.columns.numeric) + [c for t in self.side_tables().values() for c in t.numeric]
                + [f.name for f in self.features])

    def side_tables(self) -> dict[str, SideTableConfig]:
        tables = {"item_table": self.item_table, "member_table": self.member_table}
        return {role: t for role, t in tables.items() if t is not None}

    def _check_names(self) -> None:
        for kind, names, where in (
                ("categorical", self.categorical_names(), "columns.categoricals and the side tables"),
                ("context", self.context_names(), "columns.numeric, the side tables and features"),
                ("dense", list(self.columns.dense), "columns.dense")):
            require(len(set(names)) == len(names), f"{kind} names", names, f"distinct across {where}")
            require(all(n.isidentifier() for n in names), f"{kind} names", names,
                    "identifiers (letters, digits, _)")
        require(set(self.categorical_names()).isdisjoint(ENTITY_KEYS), "categorical names",
                self.categorical_names(), f"names other than {list(ENTITY_KEYS)} (feature keys)")

    def _check_feature(self, f: FeatureConfig) -> None:
        keys = set(ENTITY_KEYS) | set(self.categorical_names())
        require(set(f.keys) <= keys, f"features.{f.name}.keys", list(f.keys), f"some of {sorted(keys)}")
        require(f.action is None or f.action in self.columns.actions, f"features.{f.name}.action",
                f.action, f"one of columns.actions {list(self.columns.actions)}")
        require(f.kind != "item_age" or (self.item_table is not None and self.item_table.created),
                f"features.{f.name}.kind", f.kind, "used with item_table.created set")
        require("author" not in f.keys or self.author_source() is not None, f"features.{f.name}.keys",
                list(f.keys), "without author when neither columns.author nor item_table.author is set")

    def time_unit(self) -> int:
        return TIME_UNITS[self.time.unit]

    def split_list(self) -> list[Split]:
        """The splits, in epoch seconds."""
        bounds = [parse_time(b, self.time.timezone) for b in self.splits.boundaries]
        require(all(a < b for a, b in zip(bounds, bounds[1:])), "splits.boundaries",
                list(self.splits.boundaries), "increasing")
        return [Split(n, lo, hi) for n, lo, hi in zip(self.splits.names, bounds, bounds[1:])]


def parse_time(value: str, timezone: str) -> int:
    """Epoch seconds of a boundary: an integer string as is, else an ISO date/datetime in
    ``timezone`` (unless it carries its own offset)."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"splits.boundaries: {value!r} is neither epoch seconds nor an ISO "
                         "date/datetime") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return int(moment.timestamp())


@dataclass
class PrepareApp:
    """The root of ``conf/prepare.yaml``: one ``prepare`` group entry."""

    prepare: PrepareConfig = MISSING


SCHEMA_NAME = "prepare_schema"
PRIMARY_CONFIG = "prepare"
# The package's Hydra configs (feedsr/runtime/config.py's CONFIG_DIR names the same folder; this
# layer may not import feedsr.runtime).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PrepareApp)


register_schema()


def compose_prepare_config(overrides: list[str] = ()) -> DictConfig:
    """The composed config, as ``python -m feedsr.prepare`` would see it (for tests and scripts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(PRIMARY_CONFIG, overrides=list(overrides))


def to_prepare_config(cfg: DictConfig | dict | PrepareConfig) -> PrepareConfig:
    """Validate a composed config (root with ``prepare``, or the prepare node itself)."""
    if isinstance(cfg, PrepareConfig):
        return cfg
    try:
        node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
                                else cfg)
        if "hydra" in node:
            del node["hydra"]
        if "prepare" in node:
            node = node.prepare
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepareConfig), node))
    except (OmegaConfBaseException, ValueError) as e:  # OmegaConf's messages span lines: keep one
        raise PrepareError("invalid config: " + "; ".join(s.strip() for s in str(e).splitlines() if s.strip())) from None
