"""The KuaiRand converter on a slice of the real log: no future leakage, disjoint split targets,
counts that add up, duplicates counted, bad input named, and the CLI end to end.

The data is KuaiRand (Gao et al., CIKM 2022, CC BY-SA 4.0), read from the shared folder, never
copied into the repository. The expected values are recomputed here by brute force from the raw
log, independently of the converter's vectorized code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from feedsr.data import kuairand
from feedsr.data.sequences import read_dataset_meta

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/kuairand"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"KuaiRand data not found at {DATA}")

MEMBERS = 400
ENDS = {"train_end": 20220502, "valid_end": 20220504, "test_end": 20220505}
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """The raw log deduplicated by numpy (first copy kept), sorted stably by (user_id, time_ms),
    with each row's author_id; plus "raw_rows", the row count before deduplication."""
    table = pq.read_table(DATA / kuairand.LOG_FILE, columns=list(kuairand.LOG_COLUMNS))
    matrix = np.stack([table[c].to_numpy() for c in kuairand.LOG_COLUMNS], axis=1)
    keep = np.sort(np.unique(matrix, axis=0, return_index=True)[1])
    cols = {c: table[c].to_numpy()[keep] for c in kuairand.LOG_COLUMNS}
    order = np.lexsort((cols["time_ms"], cols["user_id"]))
    cols = {c: v[order] for c, v in cols.items()}
    videos = pq.read_table(DATA / kuairand.VIDEO_FILE)
    author_of = dict(zip(videos["video_id"].to_pylist(), videos["author_id"].to_pylist()))
    cols["author_id"] = np.array([author_of[v] for v in cols["video_id"]])
    cols["raw_rows"] = table.num_rows
    return cols


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kuairand")
    return out, kuairand.convert(DATA, out, **ENDS, members=MEMBERS)


def read_split(out: Path, name: str) -> dict[str, np.ndarray]:
    """A split's impressions flattened in file order, with "member_id" per impression and
    "is_target" marking each row's trailing num_targets."""
    table = pa.concat_tables(pq.read_table(f) for f in sorted((out / name).glob("*.parquet")))
    lengths = pc.list_value_length(table["item_ids"]).to_numpy()
    flat = {c: table[c].combine_chunks().flatten().to_numpy()
            for c in table.column_names if c not in ("member_id", "num_targets")}
    flat["member_id"] = np.repeat(table["member_id"].to_numpy(), lengths)
    position_from_end = np.concatenate([np.arange(n)[::-1] for n in lengths])
    flat["is_target"] = position_from_end < np.repeat(table["num_targets"].to_numpy(), lengths)
    return flat


def targets(out: Path, name: str) -> dict[str, np.ndarray]:
    flat = read_split(out, name)
    return {c: v[flat["is_target"]] for c, v in flat.items()}


def selected(raw: dict) -> np.ndarray:
    """Mask of the raw rows that belong to the first MEMBERS user ids."""
    return np.isin(raw["user_id"], np.unique(raw["user_id"])[:MEMBERS])


def test_counts_before_ignores_same_millisecond_events():
    keys = [np.array([7, 7, 7, 7, 3, 7])]
    time_ms = np.array([10, 20, 20, 30, 20, 20])
    clicks = np.array([[1], [1], [0], [1], [1], [1]])
    got = kuairand.counts_before(keys, time_ms, clicks)[:, 0]
    # Key 7: t=10 sees nothing; the three t=20 rows see only t=10; t=30 sees all four earlier.
    np.testing.assert_array_equal(got, [0, 1, 1, 3, 0, 1])
    np.testing.assert_array_equal(kuairand.counts_before([], time_ms, clicks)[:, 0],
                                  [0, 1, 1, 4, 1, 1])


def test_context_is_point_in_time(raw, converted):
    """ctx values of sampled targets equal brute-force counts over strictly earlier events."""
    out, meta = converted
    mine = selected(raw)
    rng = np.random.default_rng(0)
    for name in SPLITS:
        split = meta["splits"][name]
        got = targets(out, name)
        window = mine & (raw["time_ms"] // 1000 >= split["start"]) & (
            raw["time_ms"] // 1000 < split["end"])
        expected = np.flatnonzero(window)  # the split's targets, in the same (member, time) order
        np.testing.assert_array_equal(got["item_ids"], raw["video_id"][expected])
        np.testing.assert_array_equal(got["timestamps"], raw["time_ms"][expected] // 1000)
        # Rows that share their millisecond with another event exercise the tie rule.
        values, counts = np.unique(raw["time_ms"], return_counts=True)
        tied = np.flatnonzero(np.isin(raw["time_ms"][expected], values[counts > 1]))
        sample = np.union1d(rng.choice(len(expected), 60, replace=False), tied)
        for i in sample:
            check_impression(raw, expected[i], {c: v[i] for c, v in got.items()})


def check_impression(raw: dict, row: int, got: dict) -> None:
    earlier = raw["time_ms"] < raw["time_ms"][row]
    clicks = raw["is_click"] != 0
    video = earlier & (raw["video_id"] == raw["video_id"][row])
    author = earlier & (raw["author_id"] == raw["author_id"][row])
    pair = earlier & (raw["user_id"] == raw["user_id"][row]) & (
        raw["author_id"] == raw["author_id"][row])
    rate = kuairand.smoothed_rate(clicks[video].sum(), video.sum(), clicks[earlier].sum(),
                                  earlier.sum())
    assert got["ctx_video_log_imps"] == pytest.approx(np.log1p(video.sum()), rel=1e-6)
    assert got["ctx_video_click_rate"] == pytest.approx(rate, rel=1e-5)
    assert got["ctx_author_log_imps"] == pytest.approx(np.log1p(author.sum()), rel=1e-6)
    assert got["ctx_member_author_log_imps"] == pytest.approx(np.log1p(pair.sum()), rel=1e-6)
    assert got["ctx_member_author_log_clicks"] == pytest.approx(
        np.log1p(clicks[pair].sum()), rel=1e-6)


def test_split_targets_are_disjoint_and_inside_their_window(converted):
    out, meta = converted
    seen = {}
    for name in SPLITS:
        split = meta["splits"][name]
        flat = read_split(out, name)
        ts, is_target = flat["timestamps"], flat["is_target"]
        assert np.all((ts[is_target] >= split["start"]) & (ts[is_target] < split["end"]))
        assert np.all(ts[~is_target] < split["start"])  # history only from before the split
        keys = zip(flat["member_id"][is_target], ts[is_target], flat["item_ids"][is_target])
        for key in keys:
            assert seen.setdefault(key, name) == name, f"target {key} in {seen[key]} and {name}"


def test_counts_add_up(raw, converted):
    out, meta = converted
    assert meta["duplicates_dropped"] == raw["raw_rows"] - len(raw["user_id"])
    start, end = meta["splits"]["train"]["start"], meta["splits"]["test"]["end"]
    ts = raw["time_ms"] // 1000
    in_range = selected(raw) & (ts >= start) & (ts < end)
    assert sum(meta["splits"][s]["targets"] for s in SPLITS) == in_range.sum()


def test_pre_window_history_is_prepended_and_never_a_target(converted, tmp_path):
    out, meta = converted
    hist_meta = kuairand.convert(DATA, tmp_path / "hist", **ENDS, members=MEMBERS, pre_history=True)
    history = pq.read_table(DATA / kuairand.HISTORY_FILE).to_pydict()
    by_user = {u: i for i, u in enumerate(history["user_id"])}
    train_start = meta["splits"]["train"]["start"]
    for name in SPLITS:
        # the targets are exactly those of the conversion without history
        base, new = targets(out, name), targets(tmp_path / "hist", name)
        for column in ("member_id", "item_ids", "timestamps", "action_bits"):
            assert np.array_equal(base[column], new[column]), (name, column)
    table = pq.read_table(next((tmp_path / "hist" / "train").glob("*.parquet")))
    checked = 0
    for row in table.slice(0, 60).to_pylist():
        if row["member_id"] not in by_user:
            continue
        i = by_user[row["member_id"]]
        watched = history["watch_seq"][i]
        n = len(watched)
        assert row["item_ids"][:n] == watched  # in watch_seq order, before the log's impressions
        last = min(history["last_time_ms"][i] // 1000, train_start - 1)
        assert row["timestamps"][:n] == [last] * n
        long_views, likes = set(history["long_watch_seq"][i]), set(history["like_seq"][i])
        expected = [1 | (v in long_views) << 1 | (v in likes) << 2 for v in watched]
        assert row["action_bits"][:n] == expected
        assert row["cat_tab"][:n] == [0] * n and row["ctx_video_click_rate"][:n] == [0.0] * n
        assert row["cat_tab"][n] != 0  # the log's own impressions follow
        checked += 1
    assert checked >= 20
    members = set(read_split(out, "train")["member_id"]) | set(read_split(out, "test")["member_id"])
    members |= set(read_split(out, "valid")["member_id"])
    assert hist_meta["pre_history_impressions"] == sum(
        len(w) for u, w in zip(history["user_id"], history["watch_seq"]) if u in members)


def split_tables(out: Path) -> dict[str, pa.Table]:
    return {str(f.relative_to(out)): pq.read_table(f) for f in sorted(out.glob("*/*.parquet"))}


def write_log_rows(path: Path, start: int, count: int, drop: str | None = None) -> Path:
    """An extra log file: ``count`` rows of the real log from ``start``, less column ``drop``."""
    table = pq.read_table(DATA / kuairand.LOG_FILE).slice(start, count)
    pq.write_table(table.drop_columns([drop]) if drop else table, path)
    return path


def test_a_duplicated_row_is_counted_and_changes_nothing(converted, tmp_path):
    out, meta = converted
    extra = write_log_rows(tmp_path / "dup.parquet", 5, 1)  # user 0's: a selected member
    again = kuairand.convert(DATA, tmp_path / "out", **ENDS, extra_logs=[extra], members=MEMBERS)
    assert again["duplicates_dropped"] == meta["duplicates_dropped"] + 1
    assert again["splits"] == meta["splits"]
    base, new = split_tables(out), split_tables(tmp_path / "out")
    assert base.keys() == new.keys()
    for name in base:
        assert base[name].equals(new[name]), name


def test_missing_column_names_file_and_column(tmp_path):
    bad = write_log_rows(tmp_path / "bad.parquet", 0, 10, drop="tab")
    with pytest.raises(ValueError, match=r"bad\.parquet: missing column 'tab'"):
        kuairand.convert(DATA, tmp_path / "out", **ENDS, extra_logs=[bad], members=MEMBERS)


def test_cli_end_to_end(converted, tmp_path):
    out, meta = converted
    cmd = [sys.executable, str(ROOT / "scripts/prepare_kuairand.py"), "--src", str(DATA),
           "--out", str(tmp_path / "cli"), "--train-end", "20220502", "--valid-end", "20220504",
           "--test-end", "20220505", "--members", str(MEMBERS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"duplicates dropped: {meta['duplicates_dropped']:,}" in done.stdout
    assert "wall time" in done.stdout
    assert read_dataset_meta(tmp_path / "cli")["splits"] == meta["splits"]
