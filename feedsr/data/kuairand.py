"""KuaiRand impression log -> feedsr Parquet sequences with a temporal split by date.

Source: KuaiRand-Pure, from C. Gao, S. Li, Y. Zhang, J. Chen, B. Li, W. Lei, P. Jiang, X. He,
"KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly Exposed Videos", CIKM 2022,
DOI 10.1145/3511808.3557624. License CC BY-SA 4.0: the converted files are derived data and stay
under CC BY-SA 4.0 with this citation.

Choices, with the reason for each:

- Time zone: UTC+08:00 (China Standard Time, Asia/Shanghai; China has had no daylight saving time
  since 1991, so a fixed offset is exact). On the shipped log, the local date of ``time_ms`` at
  UTC+8 equals the ``date`` column for 99.1% of rows and the local hour equals ``hourmin`` for
  82.5%; the other 17.5% are the README's "an hour off" rows, whose date/hourmin match UTC+9. No
  other whole-hour offset matches more than 0.01% of the hours. ``date_agreement`` recomputes the
  date figure and dataset.json records it. Splits are cut on ``time_ms``, never on ``date``; train
  starts at local midnight of the first impression's day (141 rows fall at 23:xx on 2022-04-24,
  all of them hour-off rows labelled 20220425).
- Duplicates: exact duplicate rows (equal in every log column) are dropped, keeping the first.
- Ids: ``member_id`` = user_id. ``item_ids`` (video_id), ``author_ids`` (author_id from
  video_features_basic) and every categorical are dense ids (``feedsr.data.vocab``): 1..V in
  ascending order of the raw value, over the values seen in the training window (train
  impressions, plus the pre-window history when it is prepended), of the whole log even when
  ``members`` keeps a slice. 0 means null, not in the side table, or first seen after training:
  such a value would otherwise get an embedding row that never trained. Raw author ids reach
  8.7 million, so taken modulo a table they collided; dense, a table of V + 1 rows holds them
  all. dataset.json records each ``vocab_sizes``; vocab.json the raw values in id order.
- Categoricals (``cat_<name>``): from the log for ``tab``, video_features_basic for video
  fields, user_features for user fields. ``tag`` is the first of a video's comma-separated tags.
- Context (``ctx_<name>``): point-in-time, from the deduplicated log itself, counting only events
  with a strictly smaller ``time_ms`` (events sharing a millisecond do not see each other). They are
  computed on the whole log before ``members`` narrows it, so a slice's features equal the full
  conversion's. video_features_statistic is never read: it covers the whole window, future included.
  Rates are smoothed towards the global rate so far: (k + a * p) / (n + a), with a =
  ``PRIOR_WEIGHT`` pseudo-impressions and p = (K + 1) / (N + 2) over all earlier events.
  ``post_age_days`` counts from local midnight of ``upload_dt`` (day granularity); an unknown upload
  date gives ``AGE_FILL``. ``log_duration`` is log1p(duration_ms / 1000); the log uses 0 for unknown
  durations, which stays 0.
- Pre-window history (``pre_history=True``, the default of ``make kuairand``): each member's
  ``watch_seq`` from user_history_until_20220424_last50 (the last <= 50 videos watched before the
  log starts) is prepended as non-target impressions: click set (watched), long_view / like set
  when the video is in the member's ``long_watch_seq`` / ``like_seq``, other actions unknown (0).
  The file has no per-item times: the items keep ``watch_seq`` order (read as oldest first) and
  all get the timestamp ``min(last_time_ms, train start - 1 s)``, so they are always history and
  never targets. Their ``tab`` is unknown (0), which also tells the model they are not feed
  impressions; their context features are 0 (they are not in the log, so nothing is counted for
  them and they do not count towards anyone's context). Without it a member's history is only the
  log itself: 5.7 train impressions per member on average.
- user_features is one snapshot without a date, so its categoricals may be slightly newer than
  early impressions; they are coarse buckets (activity level, follow/registration ranges).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feedsr.data.pit import counts_before
from feedsr.data.schema import CATEGORICAL_PREFIX, CONTEXT_PREFIX, ID_COLUMNS, UNKNOWN_POSITION
from feedsr.data.sequences import DATASET_META, Split, check_log, write_dataset_meta, write_split
from feedsr.data.output import claim
from feedsr.data.tasks import encode_actions
from feedsr.data.vocab import VOCAB_SIZES, apply_vocab, build_vocab, vocab_size, write_vocabs

logger = logging.getLogger(__name__)

LOG_FILE = "log_standard_20220425_to_20220505.parquet"
VIDEO_FILE = "video_features_basic.parquet"
USER_FILE = "user_features.parquet"
HISTORY_FILE = "user_history_until_20220424_last50.parquet"
LOG_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)
ACTION_COLUMNS = {  # action name -> log column; the order is the bit order of action_bits
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
    "profile_enter": "is_profile_enter",
}
ACTION_NAMES = list(ACTION_COLUMNS)
VIDEO_CATEGORICALS = ("video_type", "upload_type", "music_type", "tag")
USER_CATEGORICALS = ("user_active_degree", "is_video_author", "follow_user_num_range",
                     "register_days_range")
CONTEXT_NAMES = (
    "video_log_imps", "video_click_rate", "video_long_view_rate", "video_like_rate",
    "author_log_imps", "author_click_rate", "member_author_log_imps", "member_author_log_clicks",
    "post_age_days", "log_duration",
)

UTC_OFFSET_S = 8 * 3600
TZ = timezone(timedelta(seconds=UTC_OFFSET_S))
TIMEZONE_NAME = "UTC+08:00 (China Standard Time, Asia/Shanghai)"
DAY_S = 86_400
MISSING = -1  # a raw id or categorical code that is null or absent; no vocabulary holds it
PRIOR_WEIGHT = 20.0  # pseudo-impressions of the global rate in every smoothed rate
AGE_FILL = -1.0  # post_age_days when upload_dt is unknown; real ages are >= 0
LICENSE = "CC BY-SA 4.0, KuaiRand (Gao et al., CIKM 2022)"


# ---------------------------------------------------------------- reading the log


def _read_table(path: Path) -> pa.Table:
    """A log file as Arrow: Parquet, or CSV (the official KuaiRand distribution is CSV)."""
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    return pq.read_table(path)


def read_log(path: str | Path) -> pa.Table:
    """One log file, checked: every column of ``LOG_COLUMNS`` present, integer-valued, no nulls.

    Raises ValueError naming the file and the column. Extra columns are ignored.
    """
    path = Path(path)
    table = _read_table(path)
    columns = {}
    for name in LOG_COLUMNS:
        if name not in table.column_names:
            raise ValueError(f"{path}: missing column '{name}'")
        col = table[name]
        if col.null_count:
            raise ValueError(f"{path}: column '{name}' has {col.null_count} null values")
        try:
            columns[name] = col.cast(pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{path}: column '{name}' is not integer ({col.type}): {e}") from e
    return pa.table(columns)


def dedup_and_sort(table: pa.Table) -> tuple[dict[str, np.ndarray], int]:
    """Drop exact duplicate rows (keeping the first) and sort by (user_id, time_ms), stable.

    Returns the columns as numpy arrays and the number of rows dropped. Stability keeps the input
    order (file order, then the extra logs) among events of one member in the same millisecond.
    """
    row = np.arange(table.num_rows)
    firsts = (
        table.append_column("__row", pa.array(row))
        .group_by(list(LOG_COLUMNS), use_threads=False)
        .aggregate([("__row", "min")])
    )
    keep = np.sort(firsts["__row_min"].to_numpy())
    cols = {name: table[name].to_numpy()[keep] for name in LOG_COLUMNS}
    order = np.lexsort((cols["time_ms"], cols["user_id"]))  # lexsort is stable
    return {name: values[order] for name, values in cols.items()}, table.num_rows - len(keep)


# ---------------------------------------------------------------- days and splits


def day_start(yyyymmdd: int) -> int:
    """Epoch seconds of local (UTC+8) midnight starting the day YYYYMMDD."""
    if len(str(yyyymmdd)) != 8:  # strptime alone would read 2022052 as 2022-05-02
        raise ValueError(f"dates are YYYYMMDD, got {yyyymmdd}")
    day = datetime.strptime(str(yyyymmdd), "%Y%m%d").replace(tzinfo=TZ)
    return int(day.timestamp())


def _local_days(seconds: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 in local time."""
    return (seconds + UTC_OFFSET_S) // DAY_S


def _as_yyyymmdd(days: np.ndarray) -> np.ndarray:
    """Days since the epoch -> YYYYMMDD ints."""
    d = days.astype("datetime64[D]")
    year = d.astype("datetime64[Y]").astype(np.int64) + 1970
    month = d.astype("datetime64[M]").astype(np.int64) % 12 + 1
    dom = (d - d.astype("datetime64[M]")).astype(np.int64) + 1
    return year * 10_000 + month * 100 + dom


def date_agreement(time_ms: np.ndarray, date_column: np.ndarray) -> float:
    """Share of rows whose ``date`` column equals the local date of ``time_ms``."""
    return float(np.mean(_as_yyyymmdd(_local_days(time_ms // 1000)) == date_column))


def make_splits(
    first_second: int, train_end: int, valid_end: int, test_end: int | None
) -> list[Split]:
    """Whole local days, end dates inclusive: train = first log day..train_end,
    valid = (train_end, valid_end], test = (valid_end, test_end] when given."""
    ends = [train_end, valid_end] + ([test_end] if test_end is not None else [])
    if any(a >= b for a, b in zip(ends, ends[1:])):
        raise ValueError(f"split end dates must increase, got {ends}")
    first_day = int(_local_days(first_second)) * DAY_S - UTC_OFFSET_S
    bounds = [first_day] + [day_start(e) + DAY_S for e in ends]  # no DST: a day is 86,400 s
    if bounds[1] <= first_day:
        raise ValueError(f"train_end {train_end} is before the first log day")
    names = ("train", "valid", "test")
    return [Split(name, lo, hi) for name, lo, hi in zip(names, bounds, bounds[1:])]


# ---------------------------------------------------------------- categoricals and side tables


def side_codes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of a side table's values (index in their sorted distinct values, ``MISSING``
    for null) and those distinct values: ints keep the raw order, so vocabularies can be built
    on them in numpy and turned back into raw values for vocab.json."""
    distinct = pc.unique(values).drop_null()
    distinct = distinct.take(pc.sort_indices(distinct))
    codes = pc.fill_null(pc.index_in(values, value_set=distinct), MISSING)
    return codes.to_numpy().astype(np.int64), distinct


def _lookup(ids: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Row of each id in ``table_ids`` (unique ids), -1 where the id is absent."""
    order = np.argsort(table_ids)
    pos = np.searchsorted(table_ids, ids, sorter=order).clip(0, len(table_ids) - 1)
    rows = order[pos]
    return np.where(table_ids[rows] == ids, rows, -1)


def _take(values: np.ndarray, rows: np.ndarray, fill) -> np.ndarray:
    """values[rows], with ``fill`` where rows is -1."""
    return np.where(rows >= 0, values[rows], fill)


def _read_side_table(path: Path, columns: tuple[str, ...]) -> pa.Table:
    """A feature table, with a ValueError naming the file and column if one is missing."""
    table = pq.read_table(path)
    for name in columns:
        if name not in table.column_names:
            raise ValueError(f"{path}: missing column '{name}'")
    return table


def _categoricals(columns: dict[str, pa.ChunkedArray], rows: np.ndarray) -> tuple[dict, dict]:
    """Code each column over its whole table, then gather per log row: (cat_ columns, their
    distinct values by column)."""
    per_row, distinct = {}, {}
    for name, values in columns.items():
        codes, distinct[CATEGORICAL_PREFIX + name] = side_codes(values)
        per_row[CATEGORICAL_PREFIX + name] = _take(codes, rows, MISSING)
    return per_row, distinct


def video_features(path: Path, video_ids: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Per log row from video_features_basic: ``author_ids`` (raw author_id, ``MISSING`` when the
    video is not in the table), ``upload_s`` (local midnight of upload_dt in epoch seconds, NaN
    unknown) and the video ``cat_`` codes; plus the codes' distinct values."""
    table = _read_side_table(path, ("video_id", "author_id", "upload_dt") + VIDEO_CATEGORICALS)
    rows = _lookup(video_ids, table["video_id"].to_numpy())
    sources = {name: table[name] for name in VIDEO_CATEGORICALS}
    sources["tag"] = pc.list_element(pc.split_pattern(table["tag"], ","), 0)  # first tag only
    per_row, distinct = _categoricals(sources, rows)
    per_row["author_ids"] = _take(table["author_id"].to_numpy(), rows, MISSING)
    upload = pc.strptime(table["upload_dt"], format="%Y-%m-%d", unit="s", error_is_null=True)
    upload_s = pc.cast(upload, pa.int64()).to_numpy(zero_copy_only=False) - UTC_OFFSET_S
    per_row["upload_s"] = _take(upload_s.astype(np.float64), rows, np.nan)
    return per_row, distinct


def user_features(path: Path, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Per log row: the user ``cat_`` codes from user_features; plus their distinct values."""
    table = _read_side_table(path, ("user_id",) + USER_CATEGORICALS)
    rows = _lookup(user_ids, table["user_id"].to_numpy())
    return _categoricals({name: table[name] for name in USER_CATEGORICALS}, rows)


def action_bits(cols: dict[str, np.ndarray]) -> np.ndarray:
    """int64 bitmask per impression: bit i = ``ACTION_NAMES[i]`` happened."""
    return encode_actions(np.stack([cols[column] for column in ACTION_COLUMNS.values()], axis=1))


# ---------------------------------------------------------------- point-in-time context


def smoothed_rate(pos, imps, global_pos, global_imps) -> np.ndarray:
    """(pos + a * p) / (imps + a), p = the global rate so far with a Laplace start."""
    prior = (global_pos + 1.0) / (global_imps + 2.0)
    return (pos + PRIOR_WEIGHT * prior) / (imps + PRIOR_WEIGHT)


def context_features(
    cols: dict[str, np.ndarray], author_ids: np.ndarray, upload_s: np.ndarray
) -> dict[str, np.ndarray]:
    """The ``CONTEXT_NAMES`` features per impression, valued strictly before its time_ms."""
    t = cols["time_ms"]
    events = np.stack(  # (n, 4): impression, click, long_view, like
        [np.ones_like(t), cols["is_click"] != 0, cols["long_view"] != 0, cols["is_like"] != 0], 1
    ).astype(np.int64)
    glob = counts_before([], t, events)
    video = counts_before([cols["video_id"]], t, events)
    # MISSING lumps all videos absent from video_features_basic: not a real author, so no counts.
    known = (author_ids != MISSING)[:, None]
    author = counts_before([author_ids], t, events[:, :2]) * known
    pair = counts_before([cols["user_id"], author_ids], t, events[:, :2]) * known
    age = (t // 1000 - upload_s) / DAY_S
    features = {
        "video_log_imps": np.log1p(video[:, 0]),
        "video_click_rate": smoothed_rate(video[:, 1], video[:, 0], glob[:, 1], glob[:, 0]),
        "video_long_view_rate": smoothed_rate(video[:, 2], video[:, 0], glob[:, 2], glob[:, 0]),
        "video_like_rate": smoothed_rate(video[:, 3], video[:, 0], glob[:, 3], glob[:, 0]),
        "author_log_imps": np.log1p(author[:, 0]),
        "author_click_rate": smoothed_rate(author[:, 1], author[:, 0], glob[:, 1], glob[:, 0]),
        "member_author_log_imps": np.log1p(pair[:, 0]),
        "member_author_log_clicks": np.log1p(pair[:, 1]),
        # upload_dt has day granularity, so an impression on the upload day could come out < 0.
        "post_age_days": np.where(np.isnan(age), AGE_FILL, np.maximum(age, 0.0)),
        "log_duration": np.log1p(cols["duration_ms"] / 1000.0),
    }
    return {name: features[name].astype(np.float32) for name in CONTEXT_NAMES}


# ---------------------------------------------------------------- the converter


def build_log(cols: dict[str, np.ndarray], src: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The flat feedsr log (see ``feedsr.data.sequences``) with raw ids and categorical codes
    (``MISSING`` for unknown), and the distinct values behind each side-table code."""
    video, video_distinct = video_features(src / VIDEO_FILE, cols["video_id"])
    user, user_distinct = user_features(src / USER_FILE, cols["user_id"])
    log = {
        "member_id": cols["user_id"],
        "item_ids": cols["video_id"],
        "author_ids": video.pop("author_ids"),
        "timestamps": cols["time_ms"] // 1000,
        "positions": np.full(len(cols["tab"]), UNKNOWN_POSITION, dtype=np.int64),  # no feed position
        "action_bits": action_bits(cols),
        CATEGORICAL_PREFIX + "tab": cols["tab"],
    }
    context = context_features(cols, log["author_ids"], video.pop("upload_s"))
    log.update(video)
    log.update(user)
    log.update({CONTEXT_PREFIX + name: values for name, values in context.items()})
    return log, {**video_distinct, **user_distinct}


def history_log(src: Path, before_second: int) -> dict[str, np.ndarray]:
    """The pre-window watch history as flat log columns (see the module doc), unsorted."""
    path = src / HISTORY_FILE
    table = _read_side_table(path, ("user_id", "last_time_ms", "watch_seq", "like_seq", "long_watch_seq"))
    watch = table["watch_seq"].combine_chunks()
    lengths = pc.list_value_length(watch).fill_null(0).to_numpy()
    users = np.repeat(table["user_id"].to_numpy(), lengths)
    videos = pc.list_flatten(watch).to_numpy()
    if len(videos) != lengths.sum() or (videos < 0).any():
        raise ValueError(f"{path}: watch_seq holds null or negative video ids")
    seconds = np.minimum(table["last_time_ms"].to_numpy() // 1000, before_second - 1)
    cols = {"user_id": users, "video_id": videos, "time_ms": np.repeat(seconds, lengths) * 1000}
    for column in ACTION_COLUMNS.values():
        cols[column] = np.zeros(len(videos), dtype=np.int64)
    cols["is_click"][:] = 1
    cols["long_view"] = _in_member_list(table, "long_watch_seq", users, videos)
    cols["is_like"] = _in_member_list(table, "like_seq", users, videos)
    video, _ = video_features(src / VIDEO_FILE, videos)
    user, _ = user_features(src / USER_FILE, users)
    video.pop("upload_s")
    log = {
        "member_id": users,
        "item_ids": videos,
        "author_ids": video.pop("author_ids"),
        "timestamps": cols["time_ms"] // 1000,
        "positions": np.full(len(videos), UNKNOWN_POSITION, dtype=np.int64),
        "action_bits": action_bits(cols),
        CATEGORICAL_PREFIX + "tab": np.full(len(videos), MISSING, dtype=np.int64),
    }
    log.update(video)
    log.update(user)
    log.update({CONTEXT_PREFIX + name: np.zeros(len(videos), np.float32) for name in CONTEXT_NAMES})
    return log


def _in_member_list(table: pa.Table, column: str, users: np.ndarray, videos: np.ndarray) -> np.ndarray:
    """1 where (user, video) appears in that user's list ``column``, else 0."""
    lists = table[column].combine_chunks()
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy()
    pairs = set(zip(np.repeat(table["user_id"].to_numpy(), lengths).tolist(),
                    pc.list_flatten(lists).to_numpy().tolist()))
    return np.fromiter(((u, v) in pairs for u, v in zip(users.tolist(), videos.tolist())),
                       dtype=np.int64, count=len(users))


def prepend(history: dict[str, np.ndarray], log: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """history + log, sorted by (member, timestamp), stable: history first, each part in order."""
    both = {name: np.concatenate([history[name], values]) for name, values in log.items()}
    order = np.lexsort((both["timestamps"], both["member_id"]))
    return {name: values[order] for name, values in both.items()}


def take_rows(log: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in log.items()}


def first_members(log: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The rows of the ``count`` smallest member ids."""
    return take_rows(log, np.isin(log["member_id"], np.unique(log["member_id"])[:count]))


def id_columns(log: dict[str, np.ndarray]) -> list[str]:
    """The columns that get a dense vocabulary: item and author ids, every categorical."""
    return list(ID_COLUMNS) + [c for c in log if c.startswith(CATEGORICAL_PREFIX)]


def build_vocabs(parts: list[dict[str, np.ndarray]], end_second: int) -> dict[str, np.ndarray]:
    """Per id column, the vocabulary of its known values on the impressions of ``parts`` before
    ``end_second`` (the end of the training window)."""
    vocabs = {}
    for column in id_columns(parts[0]):
        seen = [p[column][(p["timestamps"] < end_second) & (p[column] != MISSING)] for p in parts]
        vocabs[column] = build_vocab(np.concatenate(seen))
    return vocabs


def raw_vocabs(vocabs: dict[str, np.ndarray], distinct: dict[str, pa.Array]) -> dict[str, list]:
    """The vocabularies as raw values for vocab.json: side-table codes become the table's values."""
    return {column: distinct[column].take(pa.array(vocab)).to_pylist() if column in distinct
            else vocab.tolist() for column, vocab in vocabs.items()}


def assemble(
    cols: dict[str, np.ndarray], src: Path, splits: list[Split], members: int | None,
    pre_history: bool,
) -> tuple[dict[str, np.ndarray], dict[str, list], int]:
    """The log to write, with dense ids; the vocabularies as raw values; the history rows added.

    The vocabularies come from the whole log, before ``members`` narrows it, so a slice's ids
    equal the full conversion's (as its context features do).
    """
    log, distinct = build_log(cols, src)
    history = None
    if pre_history:
        history = history_log(src, splits[0].start)
        # Members without log impressions get no rows, so their history is no training data.
        history = take_rows(history, np.isin(history["member_id"], log["member_id"]))
    vocabs = build_vocabs([log] + ([history] if history is not None else []), splits[0].end)
    if members is not None:
        log = first_members(log, members)
    history_impressions = 0
    if history is not None:
        history = take_rows(history, np.isin(history["member_id"], log["member_id"]))
        history_impressions = len(history["member_id"])
        log = prepend(history, log)
        logger.info("prepended %d pre-window history impressions", history_impressions)
    for column, vocab in vocabs.items():
        log[column] = apply_vocab(vocab, log[column])
    return log, raw_vocabs(vocabs, distinct), history_impressions


def convert(
    src: str | Path,
    out: str | Path,
    train_end: int,
    valid_end: int,
    test_end: int | None = None,
    extra_logs: Sequence[str | Path] = (),
    max_seq_len: int = 256,
    members: int | None = None,
    pre_history: bool = False,
) -> dict:
    """Convert KuaiRand under ``src`` into feedsr sequences under ``out``; return dataset.json.

    Dates are YYYYMMDD ints, inclusive, in local time (UTC+8). ``extra_logs`` are more log files
    in the same format, appended to the log before deduplication and splitting. ``members`` keeps
    only the first N user ids (for tests); context features and vocabularies still see the whole
    log. ``pre_history`` prepends each member's pre-window watch history (see the module doc).
    """
    src, out = Path(src), Path(out)
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if members is not None and members < 1:
        raise ValueError(f"members must be >= 1 or None, got {members}")
    claim(out)  # before any work: never over a user's files
    log_paths = [src / LOG_FILE, *map(Path, extra_logs)]
    tables = []
    for path in log_paths:
        tables.append(read_log(path))
        logger.info("read %s: %d rows", path, tables[-1].num_rows)
    cols, duplicates = dedup_and_sort(pa.concat_tables(tables))
    if len(cols["time_ms"]) == 0:
        raise ValueError(f"no impressions in {[str(p) for p in log_paths]}")
    agreement = date_agreement(cols["time_ms"], cols["date"])
    logger.info("dropped %d duplicate rows; date column agrees with UTC+8 on %.2f%% of rows",
                duplicates, 100 * agreement)
    splits = make_splits(int(cols["time_ms"].min() // 1000), train_end, valid_end, test_end)
    log, vocabs, history_impressions = assemble(cols, src, splits, members, pre_history)
    check_log(log)
    logger.info("built %d impressions of %d members", len(log["member_id"]),
                len(np.unique(log["member_id"])))
    (out / DATASET_META).unlink(missing_ok=True)  # its presence must keep meaning "complete"
    counts = {}
    for split in splits:
        counts[split.name] = write_split(out, log, split, ACTION_NAMES, max_seq_len)
        logger.info("wrote %s: %s", split.name, counts[split.name])
    write_vocabs(out, vocabs)
    meta = {
        "source": "kuairand",
        "action_names": ACTION_NAMES,
        "categorical": [c.removeprefix(CATEGORICAL_PREFIX) for c in vocabs
                        if c.startswith(CATEGORICAL_PREFIX)],
        VOCAB_SIZES: {column: vocab_size(values) for column, values in vocabs.items()},
        "context": list(CONTEXT_NAMES),
        "true_probs": [],
        "splits": counts,
        "duplicates_dropped": duplicates,
        "inputs": [p.name for p in log_paths] + [VIDEO_FILE, USER_FILE]
        + ([HISTORY_FILE] if pre_history else []),
        "pre_history_impressions": history_impressions,
        "train_end": train_end,
        "valid_end": valid_end,
        "test_end": test_end,
        "max_seq_len": max_seq_len,
        "members": members,
        "timezone": TIMEZONE_NAME,
        "date_agreement": agreement,
        "license": LICENSE,
    }
    write_dataset_meta(out, meta)
    return meta
