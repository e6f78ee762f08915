"""The KuaiRand converter on a slice of the real log: no future leakage, disjoint split targets,
dense one-to-one ids, counts that add up, duplicates counted, bad input named, and the CLI end to end.

The data is KuaiRand (Gao et al., CIKM 2022, CC BY-SA 4.0), read from the shared folder, never
copied into the repository. The expected values are recomputed here by brute force from the raw
log, independently of the converter's vectorized code. Without the data the tests skip locally;
under CI=true they fail, so a CI machine that lost the data cannot pass by skipping them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from feedsr.data import kuairand
from feedsr.data.sequences import read_dataset_meta
from feedsr.data.tasks import encode_actions
from feedsr.data.vocab import read_vocabs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/kuairand"
IN_CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.skipif(not DATA.is_dir() and not IN_CI,
                                reason=f"KuaiRand data not found at {DATA}")

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
    upload_of = dict(zip(videos["video_id"].to_pylist(), videos["upload_dt"].to_pylist()))
    cols["author_id"] = np.array([author_of[v] for v in cols["video_id"]])
    cols["upload_dt"] = np.array([upload_of[v] for v in cols["video_id"]], dtype=object)
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


def test_data_is_present():
    """Under CI=true a missing copy of the data fails here instead of skipping silently."""
    assert DATA.is_dir(), f"KuaiRand data not found at {DATA} (required when CI=true)"


def test_missing_data_fails_under_ci_and_skips_locally(tmp_path):
    # A copy of this file two levels below tmp_path looks for the data in tmp_path/shared: absent.
    copy = tmp_path / "repo/tests" / Path(__file__).name
    copy.parent.mkdir(parents=True)
    shutil.copy(__file__, copy)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(copy.parent),
           str(copy), "-k", "test_data_is_present"]
    for ci, expected_rc, summary in (("true", 1, "1 failed"), ("", 0, "1 skipped")):
        env = {**os.environ, "CI": ci}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert done.returncode == expected_rc, (ci, done.stdout[-2000:])
        assert summary in done.stdout, (ci, done.stdout[-2000:])


def target_rows(raw: dict, meta: dict, name: str) -> np.ndarray:
    """Indices into ``raw`` of split ``name``'s targets, in the converter's (member, time) order."""
    split = meta["splits"][name]
    ts = raw["time_ms"] // 1000
    return np.flatnonzero(selected(raw) & (ts >= split["start"]) & (ts < split["end"]))


def test_context_is_point_in_time(raw, converted):
    """ctx values of sampled targets equal brute-force counts over strictly earlier events."""
    out, meta = converted
    rng = np.random.default_rng(0)
    for name in SPLITS:
        got = targets(out, name)
        expected = target_rows(raw, meta, name)
        np.testing.assert_array_equal(got["member_id"], raw["user_id"][expected])
        np.testing.assert_array_equal(got["timestamps"], raw["time_ms"][expected] // 1000)
        # Rows that share their millisecond with another event exercise the tie rule.
        values, counts = np.unique(raw["time_ms"], return_counts=True)
        tied = np.flatnonzero(np.isin(raw["time_ms"][expected], values[counts > 1]))
        sample = np.union1d(rng.choice(len(expected), 60, replace=False), tied)
        for i in sample:
            check_impression(raw, expected[i], {c: v[i] for c, v in got.items()})


def check_impression(raw: dict, row: int, got: dict) -> None:
    """Every context feature of the impression ``raw[row]`` against a brute-force computation."""
    expected = expected_context(raw, row)
    assert set(expected) == set(kuairand.CONTEXT_NAMES)  # a new feature must get a check here
    for name, value in expected.items():
        assert got[f"ctx_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), (row, name)


def expected_context(raw: dict, row: int) -> dict[str, float]:
    earlier = raw["time_ms"] < raw["time_ms"][row]
    video = earlier & (raw["video_id"] == raw["video_id"][row])
    author = earlier & (raw["author_id"] == raw["author_id"][row])
    pair = author & (raw["user_id"] == raw["user_id"][row])

    def rate(where: np.ndarray, column: str) -> float:
        positive = raw[column] != 0
        prior = (positive[earlier].sum() + 1) / (earlier.sum() + 2)
        return (positive[where].sum() + kuairand.PRIOR_WEIGHT * prior) / (
            where.sum() + kuairand.PRIOR_WEIGHT)

    # Every video of this log has an upload_dt; local midnight in China Standard Time.
    upload = datetime.strptime(raw["upload_dt"][row], "%Y-%m-%d").replace(
        tzinfo=timezone(timedelta(hours=8)))
    return {
        "video_log_imps": np.log1p(video.sum()),
        "video_click_rate": rate(video, "is_click"),
        "video_long_view_rate": rate(video, "long_view"),
        "video_like_rate": rate(video, "is_like"),
        "author_log_imps": np.log1p(author.sum()),
        "author_click_rate": rate(author, "is_click"),
        "member_author_log_imps": np.log1p(pair.sum()),
        "member_author_log_clicks": np.log1p((raw["is_click"][pair] != 0).sum()),
        "post_age_days": max(0.0, (raw["time_ms"][row] // 1000 - upload.timestamp()) / 86_400),
        "log_duration": np.log1p(raw["duration_ms"][row] / 1000),
    }


def test_ids_are_dense_and_one_to_one(raw, converted):
    """Ids are 1..V over the raw values of the whole log's training window, in ascending raw
    order; a value first seen later is 0; no two raw authors or videos share an id."""
    out, meta = converted
    sizes = meta["vocab_sizes"]
    train = raw["time_ms"] // 1000 < meta["splits"]["train"]["end"]
    for column, raw_column in (("item_ids", "video_id"), ("author_ids", "author_id")):
        vocab = sorted(set(raw[raw_column][train].tolist()))
        assert sizes[column] == len(vocab) + 1
        id_of = {value: i + 1 for i, value in enumerate(vocab)}
        pairs = set()
        for name in SPLITS:
            got, rows = targets(out, name), target_rows(raw, meta, name)
            expected = [id_of.get(value, 0) for value in raw[raw_column][rows].tolist()]
            np.testing.assert_array_equal(got[column], expected)
            pairs |= set(zip(raw[raw_column][rows].tolist(), got[column].tolist()))
        ids = [i for _, i in pairs if i != 0]
        assert len(ids) == len(set(ids)), f"two raw {raw_column} values share a {column} id"
        assert any(i == 0 for _, i in pairs)  # some targets in valid/test are unseen in training
    for name in SPLITS:
        flat = read_split(out, name)
        for column, size in sizes.items():
            assert 0 <= flat[column].min() and flat[column].max() < size, (name, column)
    assert set(sizes) == {"item_ids", "author_ids"} | {f"cat_{n}" for n in meta["categorical"]}
    vocabs = read_vocabs(out)
    assert {c: len(v) + 1 for c, v in vocabs.items()} == sizes
    assert vocabs["author_ids"] == sorted(set(raw["author_id"][train].tolist()))


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


def raw_values(out: Path, column: str, ids) -> np.ndarray:
    """The raw values of dense ids, from the dataset's vocab.json; -1 for the unknown id 0."""
    vocab, ids = np.array(read_vocabs(out)[column]), np.asarray(ids)
    return np.where(ids > 0, vocab[ids - 1], -1)


def test_pre_window_history_is_prepended_and_never_a_target(raw, converted, tmp_path):
    out, meta = converted
    hist = tmp_path / "hist"
    hist_meta = kuairand.convert(DATA, hist, **ENDS, members=MEMBERS, pre_history=True)
    history = pq.read_table(DATA / kuairand.HISTORY_FILE).to_pydict()
    by_user = {u: i for i, u in enumerate(history["user_id"])}
    train_start = meta["splits"]["train"]["start"]
    for name in SPLITS:
        # the targets are exactly those of the conversion without history
        base, new = targets(out, name), targets(hist, name)
        for column in ("member_id", "timestamps", "action_bits"):
            assert np.array_equal(base[column], new[column]), (name, column)
        # the same videos; history only adds videos to the vocabulary, so fewer are unknown
        known = base["item_ids"] != 0
        assert np.all(new["item_ids"][known] != 0)
        assert np.array_equal(raw_values(out, "item_ids", base["item_ids"])[known],
                              raw_values(hist, "item_ids", new["item_ids"])[known]), name
    # The vocabulary: the training window's videos and every watched video of the log's members.
    train = raw["time_ms"] // 1000 < meta["splits"]["train"]["end"]
    in_log = set(raw["user_id"].tolist())
    watched = {v for u, w in zip(history["user_id"], history["watch_seq"]) if u in in_log for v in w}
    assert read_vocabs(hist)["item_ids"] == sorted(watched | set(raw["video_id"][train].tolist()))
    table = pq.read_table(next((hist / "train").glob("*.parquet")))
    checked = 0
    for row in table.slice(0, 60).to_pylist():
        if row["member_id"] not in by_user:
            continue
        i = by_user[row["member_id"]]
        watched = history["watch_seq"][i]
        n = len(watched)
        # in watch_seq order, before the log's impressions
        assert raw_values(hist, "item_ids", row["item_ids"][:n]).tolist() == watched
        last = min(history["last_time_ms"][i] // 1000, train_start - 1)
        assert row["timestamps"][:n] == [last] * n
        long_views, likes = set(history["long_watch_seq"][i]), set(history["like_seq"][i])
        # watched = clicked; long_view and like from the member's lists; nothing else known
        multi_hot = [[True, v in long_views, v in likes] + [False] * 5 for v in watched]
        assert kuairand.ACTION_NAMES[:3] == ["click", "long_view", "like"]
        assert row["action_bits"][:n] == encode_actions(np.array(multi_hot)).tolist()
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
    assert f"author_ids {meta['vocab_sizes']['author_ids']:,}," in done.stdout
    assert read_dataset_meta(tmp_path / "cli")["splits"] == meta["splits"]
