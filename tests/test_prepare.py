"""``feedsr.prepare`` on small real logs through the real DuckDB: every feature kind against a
brute-force recomputation, no leakage from labels at or after an impression's time, splits and
counts, vocabularies, and the trainer reading what it writes."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from conftest import compose, tiny_overrides
from feedsr.data.tasks import decode_actions
from feedsr.prepare.config import PrepareError, compose_prepare_config, to_prepare_config
from feedsr.prepare.features import plan_key_sets
from feedsr.prepare.pipeline import member_ranges, run

ACTIONS = ["click", "like", "share"]
T0 = 1_700_000_000  # 2023-11-14, seconds
STEP = 600  # times on a 10-minute grid: many ties, and 1-hour windows end exactly on events
DAY = 86_400
SESSION_GAP = 1800


# ------------------------------------------------------------------ small logs


def make_log(seed: int = 0, n: int = 360, members: int = 6, items: int = 12, span_steps: int = 60) -> dict:
    """A flat log with ties in time, null authors, string categoricals and no exact duplicates."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, items, n)
    steps = np.sort(rng.integers(0, span_steps, n))
    steps[n // 2:] += 20  # a gap of > 30 min in the middle: new sessions
    author = (item % 4).astype(np.float64)
    author[item % 5 == 0] = np.nan  # items without a known author
    log = {
        "member_id": rng.integers(0, members, n),
        "item_id": item,
        "author_id": author,
        "ts": T0 + steps * STEP,
        "position": rng.integers(0, 8, n),
        "click": (rng.random(n) < 0.4).astype(np.int64),
        "like": (rng.random(n) < 0.2).astype(np.int64),
        "share": (rng.random(n) < 0.1).astype(np.int64),
        "surface": np.array(["home", "follow", "search"])[rng.integers(0, 3, n)],
    }
    return drop_duplicates(log)


def drop_duplicates(log: dict) -> dict:
    keys = [tuple(str(log[c][i]) for c in log) for i in range(len(log["ts"]))]
    first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    return {c: v[first] for c, v in log.items()}


def write_log(log: dict, path: Path) -> Path:
    columns = dict(log)
    columns["author_id"] = pa.array(log["author_id"], pa.int64(), mask=np.isnan(log["author_id"]))
    pq.write_table(pa.table(columns), path)
    return path


def write_items(path: Path, items: int = 12) -> Path:
    """Item table: every item but the last; item 3 has no creation time."""
    ids = np.arange(items - 1)
    created = pa.array(T0 - ids * 7_000, pa.int64(), mask=ids == 3)
    pq.write_table(pa.table({
        "item_id": ids, "category": np.array(["a", "b", "c"])[ids % 3],
        "duration_s": ids * 1.5, "created_ts": created,
    }), path)
    return path


def write_members(path: Path) -> Path:
    """Member table: every member but the last (5)."""
    ids = np.arange(5)
    pq.write_table(pa.table({"member_id": ids, "segment": np.array(["new", "old"])[ids % 2],
                             "age": ids * 10.0}), path)
    return path


FEATURES = [
    {"name": "item_imps", "kind": "impressions", "keys": ["item"]},
    {"name": "item_imps_1h", "kind": "impressions", "keys": ["item"], "window_s": 3600},
    {"name": "segment_item_imps", "kind": "impressions", "keys": ["segment", "item"]},
    {"name": "author_clicks", "kind": "action_count", "keys": ["author"], "action": "click"},
    {"name": "member_author_clicks_1h", "kind": "action_count", "keys": ["member", "author"],
     "action": "click", "window_s": 3600},
    {"name": "item_click_rate", "kind": "action_rate", "keys": ["item"], "action": "click",
     "prior_rate": 0.3, "prior_strength": 5.0},
    {"name": "surface_like_rate_1h", "kind": "action_rate", "keys": ["surface"], "action": "like",
     "window_s": 3600, "prior_rate": 0.1, "prior_strength": 2.0, "log1p": True},
    {"name": "member_category_last3", "kind": "last_k_mean", "keys": ["member", "category"],
     "action": "click", "k": 3},
    {"name": "author_last2", "kind": "last_k_mean", "keys": ["author"], "action": "like", "k": 2},
    {"name": "member_since_imp", "kind": "since_impression", "keys": ["member"], "fill": -5.0},
    {"name": "member_item_since_click", "kind": "since_action", "keys": ["member", "item"],
     "action": "click", "log1p": True},
    {"name": "item_age", "kind": "item_age", "fill": -2.0},
    {"name": "session_imps", "kind": "session_impressions"},
    {"name": "session_likes", "kind": "session_actions", "action": "like"},
    {"name": "local_hour", "kind": "hour_of_day"},
    {"name": "local_weekday", "kind": "day_of_week"},
]
TIMEZONE = "Asia/Kolkata"  # UTC+05:30: local hours turn at half past the UTC hour, on the grid


def config(log_path: Path, items_path: Path, out: Path, boundaries, max_seq_len=1000, **extra) -> dict:
    cfg = {
        "name": "test", "logs": [str(log_path)], "out": str(out),
        "columns": {"member": "member_id", "item": "item_id", "timestamp": "ts", "author": "author_id",
                    "position": "position", "actions": {a: a for a in ACTIONS},
                    "categoricals": {"surface": "surface"}},
        "item_table": {"path": str(items_path), "key": "item_id", "numeric": ["duration_s"],
                       "categorical": ["category"], "created": "created_ts"},
        "member_table": {"path": str(Path(items_path).parent / "members.parquet"), "key": "member_id",
                         "numeric": ["age"], "categorical": ["segment"], "fill": -3.0},
        "features": FEATURES, "session_gap_s": SESSION_GAP, "time": {"unit": "s", "timezone": TIMEZONE},
        "splits": {"names": ["train", "valid", "test"][: len(boundaries) - 1], "boundaries": boundaries},
        "max_seq_len": max_seq_len, "rows_per_file": 3, "engine": {"threads": 1, "memory_limit": "1GB"},
    }
    return cfg | extra


def one_split(log: dict) -> list:
    """One training split holding the whole log."""
    return [int(log["ts"].min()), int(log["ts"].max()) + 1]


# ------------------------------------------------------------------ reading the output back


def read_split(out: Path, split: str) -> dict[str, np.ndarray]:
    """The split's impressions, flat, ids mapped back to raw values through vocab.json, plus
    ``target`` (whether the impression is one of its row's targets)."""
    vocab = json.loads((out / "vocab.json").read_text())
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / split).glob("part-*.parquet")))
    lengths = np.array([len(x) for x in table["item_ids"].to_pylist()])
    flat = {c: np.asarray(table[c].combine_chunks().flatten()) for c in table.column_names
            if c not in ("member_id", "num_targets")}
    flat["member_id"] = np.repeat(table["member_id"].to_numpy(), lengths)
    position_in_row = np.concatenate([np.arange(k) for k in lengths])
    flat["target"] = position_in_row >= np.repeat(lengths - table["num_targets"].to_numpy(), lengths)
    for column, values in vocab.items():
        raw = np.array([None] + values, dtype=object)
        flat["raw_" + column] = raw[flat[column]]
    return flat


def impression_key(member, ts, item, position, bits, surface) -> tuple:
    return (int(member), int(ts), int(item), int(position), int(bits), str(surface))


def output_features(out: Path, split: str = "train") -> dict[tuple, dict[str, float]]:
    flat = read_split(out, split)
    names = [c for c in flat if c.startswith("ctx_")]
    features = {}
    for i in range(len(flat["member_id"])):
        key = impression_key(flat["member_id"][i], flat["timestamps"][i], flat["raw_item_ids"][i],
                             flat["positions"][i], flat["action_bits"][i], flat["raw_cat_surface"][i])
        features[key] = {n[4:]: float(flat[n][i]) for n in names}
    return features


def log_keys(log: dict) -> list[tuple]:
    bits = sum(log[a].astype(np.int64) << i for i, a in enumerate(ACTIONS))
    return [impression_key(*row) for row in zip(log["member_id"], log["ts"], log["item_id"],
                                                log["position"], bits, log["surface"])]


# ------------------------------------------------------------------ brute force


def key_values(log: dict, items: pa.Table, key: str) -> list:
    """Per event, the value of a feature key (None when unknown)."""
    category = dict(zip(items["item_id"].to_pylist(), items["category"].to_pylist()))
    if key == "member":
        return list(log["member_id"])
    if key == "item":
        return list(log["item_id"])
    if key == "author":
        return [None if np.isnan(a) else int(a) for a in log["author_id"]]
    if key == "category":
        return [category.get(int(i)) for i in log["item_id"]]
    if key == "segment":
        return [["new", "old"][m % 2] if m < 5 else None for m in log["member_id"]]
    return list(log[key])


def sessions(log: dict) -> np.ndarray:
    """Per event, its session number within its member (gaps > SESSION_GAP split)."""
    out = np.zeros(len(log["ts"]), dtype=np.int64)
    for m in np.unique(log["member_id"]):
        idx = np.flatnonzero(log["member_id"] == m)
        times = np.unique(log["ts"][idx])
        starts = np.concatenate([[0], np.cumsum(np.diff(times) > SESSION_GAP)])
        out[idx] = starts[np.searchsorted(times, log["ts"][idx])]
    return out


def brute_force(log: dict, items: pa.Table, f: dict) -> np.ndarray:
    """The feature recomputed event by event from its definition in feedsr/prepare/features.py."""
    n, ts = len(log["ts"]), log["ts"]
    keys = list(zip(*(key_values(log, items, k) for k in f.get("keys", ["member"]))))
    session = sessions(log)
    act = log[f["action"]] if f.get("action") else np.ones(n, dtype=np.int64)
    created = dict(zip(items["item_id"].to_pylist(), items["created_ts"].to_pylist()))
    kind, fill = f["kind"], f.get("fill", -1.0)
    out = np.empty(n)
    for i in range(n):
        local = datetime.fromtimestamp(int(ts[i]), ZoneInfo(TIMEZONE))
        if kind in ("hour_of_day", "day_of_week"):
            out[i] = local.hour if kind == "hour_of_day" else local.isoweekday() % 7  # Sunday = 0
            continue
        if kind == "item_age":
            c = created.get(int(log["item_id"][i]))
            out[i] = np.nan if c is None else max(ts[i] - c, 0) / DAY
            continue
        same = np.array([k == keys[i] for k in keys])
        if kind.startswith("session_"):
            same &= session == session[i]
        earlier = same & (ts < ts[i])
        if f.get("window_s"):
            earlier &= ts >= ts[i] - f["window_s"]
        no_key = any(k is None for k in keys[i])
        j = np.flatnonzero(earlier)
        if kind in ("impressions", "session_impressions"):
            value = 0 if no_key else len(j)
        elif kind in ("action_count", "session_actions"):
            value = 0 if no_key else act[j].sum()
        elif kind == "action_rate":
            s, p = f["prior_strength"], f["prior_rate"]
            value = p if no_key else (act[j].sum() + s * p) / (len(j) + s)
        elif kind == "last_k_mean":
            order = np.lexsort((act[j], log["item_id"][j], log["member_id"][j], ts[j]))
            last = j[order][-f["k"]:]
            value = np.nan if no_key or len(last) == 0 else act[last].mean()
        elif kind == "since_impression":
            value = np.nan if no_key or len(j) == 0 else ts[i] - ts[j].max()
        elif kind == "since_action":
            hits = j[act[j] == 1]
            value = np.nan if no_key or len(hits) == 0 else ts[i] - ts[hits].max()
        out[i] = value
    if f.get("log1p"):
        out = np.log1p(out)
    return np.where(np.isnan(out), fill, out).astype(np.float32)


# ------------------------------------------------------------------ tests


@pytest.fixture
def small(tmp_path):
    log = make_log()
    write_members(tmp_path / "members.parquet")
    return log, write_log(log, tmp_path / "log.parquet"), write_items(tmp_path / "items.parquet")


@pytest.mark.parametrize("window_method", ["range", "probe"])  # auto picks one per key set
def test_every_feature_kind_equals_brute_force(small, tmp_path, window_method):
    log, log_path, items_path = small
    cfg = config(log_path, items_path, tmp_path / "out", one_split(log))
    cfg["engine"] |= {"window_method": window_method}
    meta = run(cfg)
    got = output_features(tmp_path / "out")
    keys = log_keys(log)
    assert sorted(got) == sorted(set(keys))  # every impression once, nothing else
    items = pq.read_table(items_path)
    for f in FEATURES:
        expected = brute_force(log, items, f)
        actual = np.array([got[k][f["name"]] for k in keys], dtype=np.float32)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=f["name"])
    # the side tables: numeric attributes as they are (the fill where the key is absent) ...
    actual = np.array([[got[k]["duration_s"], got[k]["age"]] for k in keys])
    expected = [[i * 1.5 if i < 11 else 0.0, m * 10.0 if m < 5 else -3.0]
                for i, m in zip(log["item_id"], log["member_id"])]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
    # ... and categoricals through their vocabularies (0 = absent from the table)
    flat = read_split(tmp_path / "out", "train")
    category = dict(zip(items["item_id"].to_pylist(), items["category"].to_pylist()))
    assert list(flat["raw_cat_category"]) == [category.get(int(i)) for i in flat["raw_item_ids"]]
    assert list(flat["raw_cat_segment"]) == [["new", "old"][m % 2] if m < 5 else None for m in flat["member_id"]]
    assert meta["context"] == ["duration_s", "age"] + [f["name"] for f in FEATURES]
    assert meta["categorical"] == ["surface", "category", "segment"]


def test_brute_force_is_not_trivial(small):
    """The fixture exercises what the features must get right: ties, exact window edges, null keys,
    sessions and the last-k cut (else the comparison above could pass without testing them)."""
    log, _, items_path = small
    ts = log["ts"]
    assert len(np.unique(ts)) < len(ts) / 3  # many ties
    assert np.isin(ts - 3600, ts).any()  # events exactly one window back
    assert np.isnan(log["author_id"]).any()
    assert sessions(log).max() >= 1
    hours = brute_force(log, pq.read_table(items_path), {"kind": "hour_of_day"})
    assert len(np.unique(hours)) >= 2 and not np.array_equal(hours, (log["ts"] // 3600) % 24)
    last3 = brute_force(log, pq.read_table(items_path), FEATURES[6])
    assert len(np.unique(last3)) > 3


def test_labels_at_or_after_t_change_no_feature_up_to_t(small, tmp_path):
    log, log_path, items_path = small
    t = int(np.median(log["ts"]))
    flipped = {c: v.copy() for c, v in log.items()}
    later = log["ts"] >= t
    for a in ACTIONS:
        flipped[a][later] = 1 - flipped[a][later]
    run(config(log_path, items_path, tmp_path / "a", one_split(log)))
    run(config(write_log(flipped, tmp_path / "flipped.parquet"), items_path, tmp_path / "b", one_split(log)))
    a, b = output_features(tmp_path / "a"), output_features(tmp_path / "b")
    keys, flipped_keys = log_keys(log), log_keys(flipped)
    changed_later = False
    for key, fkey, when in zip(keys, flipped_keys, log["ts"]):
        if when <= t:
            assert a[key] == b[fkey], (key, a[key], b[fkey])
        else:
            changed_later |= a[key] != b[fkey]
    assert changed_later  # the flip reaches the features of later impressions


def test_splits_partition_the_targets_and_counts_add_up(small, tmp_path):
    log, log_path, items_path = small
    # duplicates: two exact copies of the first 5 rows are dropped and counted
    doubled = {c: np.concatenate([v, v[:5], v[:5]]) for c, v in log.items()}
    path = write_log(doubled, tmp_path / "doubled.parquet")
    ts = np.unique(log["ts"])
    bounds = [int(ts[5]), int(ts[20]), int(ts[35]), int(ts[-3])]
    out = tmp_path / "out"
    meta = run(config(path, items_path, out, bounds, max_seq_len=7))
    assert meta["duplicates_dropped"] == 10
    keys = log_keys(log)
    targets = []
    for (name, split), lo, hi in zip(meta["splits"].items(), bounds, bounds[1:]):
        flat = read_split(out, name)
        assert flat["target"].sum() == split["targets"] == int(((log["ts"] >= lo) & (log["ts"] < hi)).sum())
        assert split["impressions"] == len(flat["target"])
        when = flat["timestamps"][flat["target"]]
        assert when.min() >= lo and when.max() < hi
        assert flat["timestamps"].max() < hi  # history never reaches past the split's end
        assert (np.diff(flat["timestamps"])[np.diff(flat["member_id"]) == 0] >= 0).all()
        targets += [impression_key(*r) for r in zip(*(flat[c][flat["target"]] for c in (
            "member_id", "timestamps", "raw_item_ids", "positions", "action_bits", "raw_cat_surface")))]
    in_splits = [k for k, when in zip(keys, log["ts"]) if bounds[0] <= when < bounds[-1]]
    assert sorted(targets) == sorted(in_splits)  # every impression a target exactly once
    assert json.loads((out / "dataset.json").read_text()) == meta


def test_vocabularies_come_from_the_training_window_and_round_trip(small, tmp_path):
    log, log_path, items_path = small
    ts = np.unique(log["ts"])
    bounds = [int(ts[0]), int(ts[30]), int(ts[-1]) + 1]
    meta = run(config(log_path, items_path, tmp_path / "out", bounds))
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text())
    train = log["ts"] < bounds[1]
    assert vocab["item_ids"] == sorted(set(log["item_id"][train].tolist()))
    authors = log["author_id"][train]
    assert vocab["author_ids"] == sorted(set(authors[~np.isnan(authors)].astype(int).tolist()))
    assert vocab["cat_surface"] == sorted(set(log["surface"][train].tolist()))
    assert vocab["cat_category"] == ["a", "b", "c"]
    assert meta["vocab_sizes"] == {c: len(v) + 1 for c, v in vocab.items()}
    for split in ("train", "valid"):
        flat = read_split(tmp_path / "out", split)
        known = flat["item_ids"] > 0
        assert known.any()
        # an id maps back to its raw value; 0 only for values unseen in training (or null)
        assert set(flat["raw_item_ids"][known]) <= set(vocab["item_ids"])
        unseen = ~np.isin(flat["raw_item_ids"], vocab["item_ids"])
        assert (flat["item_ids"][unseen] == 0).all()


def test_decoded_actions_match_the_log(small, tmp_path):
    log, log_path, items_path = small
    run(config(log_path, items_path, tmp_path / "out", one_split(log)))
    flat = read_split(tmp_path / "out", "train")
    order = np.lexsort((flat["raw_cat_surface"].astype(str), flat["positions"], flat["raw_item_ids"].astype(int),
                        flat["timestamps"], flat["member_id"]))
    expected = np.lexsort((log["surface"], log["position"], log["item_id"], log["ts"], log["member_id"]))
    decoded = decode_actions(flat["action_bits"][order], len(ACTIONS))
    np.testing.assert_array_equal(decoded, np.stack([log[a][expected] for a in ACTIONS], 1).astype(bool))


def test_prepared_log_trains_with_the_real_trainer(small, tmp_path):
    """The shipped example config on a log with its columns, then 3 training steps whose tables
    the vocabularies size (data.id_tables null)."""
    from feedsr.train.trainer import run as train

    log, log_path, items_path = small
    ts = np.unique(log["ts"])
    boundaries = [int(ts[0]), int(ts[30]), int(ts[45]), int(ts[-1]) + 1]
    cfg = compose_prepare_config([
        f"prepare.logs=[{log_path}]", f"prepare.out={tmp_path / 'data'}", f"prepare.item_table.path={items_path}",
        f"prepare.splits.boundaries=[{','.join(map(str, boundaries))}]", "prepare.engine.threads=1",
    ])
    meta = run(cfg)
    train_cfg = OmegaConf.to_container(compose(tiny_overrides(tmp_path / "data", tmp_path / "runs", "prepared")
                                               + ["trainer.max_steps=3", "trainer.checkpoint_every=0"]))
    # whole values, set in Python: overrides would merge into the synthetic data config's dicts
    train_cfg["data"] |= {
        "name": "prepared", "action_names": ACTIONS, "context": meta["context"],
        "tasks": [{"name": "click", "group": "passive"}, {"name": "like", "group": "active"},
                  {"name": "share", "group": "active"}],
        "id_tables": {"item_ids": None, "author_ids": None}, "categorical": {"surface": None, "category": None},
        "dense": meta["dense"],  # the example config passes none through
    }
    result = train(train_cfg)
    assert result.step == 3 and all(np.isfinite(result.losses))
    assert meta["vocab_sizes"]["item_ids"] == len(set(log["item_id"][log["ts"] < boundaries[1]].tolist())) + 1


def test_several_logs_in_parquet_and_csv_give_the_same_dataset(small, tmp_path):
    import pyarrow.csv as pacsv

    log, log_path, items_path = small
    odd = np.arange(len(log["ts"])) % 2 == 1  # interleaved in time: both files feed every feature
    write_log({c: v[~odd] for c, v in log.items()}, tmp_path / "even.parquet")
    write_log({c: v[odd] for c, v in log.items()}, tmp_path / "odd.parquet")
    pacsv.write_csv(pq.read_table(tmp_path / "odd.parquet"), tmp_path / "odd.csv")
    run(config(log_path, items_path, tmp_path / "one", one_split(log)))
    two = config(log_path, items_path, tmp_path / "two", one_split(log),
                 logs=[str(tmp_path / "even.parquet"), str(tmp_path / "odd.csv")])
    run(two)
    assert output_features(tmp_path / "two") == output_features(tmp_path / "one")
    assert (tmp_path / "two" / "vocab.json").read_text() == (tmp_path / "one" / "vocab.json").read_text()


def test_many_small_chunks_give_the_same_dataset_as_one(small, tmp_path, capsys):
    """The write step streams whole members out of DuckDB in chunks: files, ids and counts must
    not depend on the chunk size, rows_per_file included (rows wait for the next chunk)."""
    log, log_path, items_path = small
    ts = np.unique(log["ts"])
    bounds = [int(ts[5]), int(ts[20]), int(ts[35]), int(ts[-3])]
    run(config(log_path, items_path, tmp_path / "one", bounds, max_seq_len=7), chunk_rows=10**9)
    assert capsys.readouterr().out.count("windowed") == 1
    run(config(log_path, items_path, tmp_path / "many", bounds, max_seq_len=7), chunk_rows=5)
    assert capsys.readouterr().out.count("windowed") == len(np.unique(log["member_id"]))  # one a member
    listing = lambda out: sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())  # noqa: E731
    files = listing(tmp_path / "one")
    assert files == listing(tmp_path / "many")
    for path in files:
        assert (tmp_path / "many" / path).read_bytes() == (tmp_path / "one" / path).read_bytes(), path
    members_per_file = [len(set(pq.read_table(tmp_path / "many" / p)["member_id"].to_pylist()))
                        for p in files if p.suffix == ".parquet"]
    assert max(members_per_file) > 1  # some file holds rows of two chunks
    # the member's key sets (sessions too) ran per chunk above, the others over the whole log
    cfg = to_prepare_config(config(log_path, items_path, tmp_path / "plan", bounds))
    per_chunk = {p.keys for p in plan_key_sets(cfg) if p.per_chunk}
    assert per_chunk == {("author", "member"), ("category", "member"), ("member",), ("item", "member"),
                         ("member", "session")}
    assert {p.keys for p in plan_key_sets(cfg)} - per_chunk == {("item",), ("item", "segment"), ("author",),
                                                                ("surface",)}


def test_member_ranges_cut_between_members_only():
    # members stored by member: rids contiguous per member, listed here out of order
    first, last, count = np.array([6, 1, 14, 5]), np.array([13, 4, 15, 5]), np.array([8, 4, 2, 1])
    assert member_ranges(first, last, count, chunk_rows=5) == [(1, 5), (6, 13), (14, 15)]
    assert member_ranges(first, last, count, chunk_rows=1) == [(1, 4), (5, 5), (6, 13), (14, 15)]
    assert member_ranges(first, last, count, chunk_rows=100) == [(1, 15)]
    assert member_ranges(np.array([]), np.array([]), np.array([]), chunk_rows=5) == []


# ------------------------------------------------------------------ pre-window history


def history_log(log: dict, seed: int = 5) -> dict:
    """Earlier impressions (before the log) of members 0..3 and of member 42, absent from the log."""
    rng = np.random.default_rng(seed)
    member = np.repeat([0, 1, 2, 3, 42], 4)
    n = len(member)
    return drop_duplicates({
        "member_id": member, "item_id": rng.integers(0, 14, n),  # items 12, 13: unseen in the log
        "author_id": rng.integers(0, 4, n).astype(np.float64),
        "ts": int(log["ts"].min()) - DAY + rng.integers(0, 50, n) * STEP,
        "position": np.full(n, 3), "click": np.ones(n, dtype=np.int64),
        "like": rng.integers(0, 2, n), "share": np.zeros(n, dtype=np.int64),
        "surface": np.array(["home"] * n),
    })


def test_history_is_prepended_as_non_targets_and_counts_for_nobody(small, tmp_path):
    log, log_path, items_path = small
    history = history_log(log)
    hist_path = write_log(history, tmp_path / "history.parquet")
    cfg = config(log_path, items_path, tmp_path / "plain", one_split(log))
    run(cfg)
    meta = run(cfg | {"out": str(tmp_path / "with"), "history": {"logs": [str(hist_path)]}})
    kept = np.isin(history["member_id"], log["member_id"])
    assert meta["history_impressions"] == kept.sum() == 16  # member 42 has no log impression
    flat = read_split(tmp_path / "with", "train")
    is_history = flat["timestamps"] < log["ts"].min()
    assert is_history.sum() == 16 and not flat["target"][is_history].any()
    assert 42 not in flat["member_id"]
    # the log's impressions: the same features as without history; history rows get the fills
    plain, with_history = output_features(tmp_path / "plain"), output_features(tmp_path / "with")
    for key in log_keys(log):
        assert with_history[key] == plain[key], key
    # counted features get their fill; the impression's own attributes (item age, local time) are as usual
    fills = {f["name"]: f.get("fill", -1.0) for f in FEATURES if f["kind"] not in ("item_age", "hour_of_day", "day_of_week")}
    history_keys = set(with_history) - set(plain)
    assert len(history_keys) == 16
    for key in history_keys:
        assert {n: with_history[key][n] for n in fills} == fills, key
    # a history item unseen in the log gets a vocabulary entry (the training window includes history)
    assert {12, 13} & set(flat["raw_item_ids"][is_history]) <= set(json.loads((tmp_path / "with" / "vocab.json").read_text())["item_ids"])


def test_history_counted_in_features_equals_brute_force_over_both(small, tmp_path):
    log, log_path, items_path = small
    history = history_log(log)
    history = {c: v[history["member_id"] != 42] for c, v in history.items()}
    hist_path = write_log(history, tmp_path / "history.parquet")
    both = {c: np.concatenate([history[c], log[c]]) for c in log}
    run(config(log_path, items_path, tmp_path / "out", one_split(log),
               history={"logs": [str(hist_path)], "count_in_features": True}))
    got = output_features(tmp_path / "out")
    items = pq.read_table(items_path)
    keys = log_keys(both)
    for f in FEATURES:
        expected = brute_force(both, items, f)
        actual = np.array([got[k][f["name"]] for k in keys], dtype=np.float32)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=f["name"])


def test_history_at_or_after_the_first_boundary_is_refused(small, tmp_path):
    log, log_path, items_path = small
    history = history_log(log)
    history["ts"][3] = int(log["ts"].min())  # the first boundary
    hist_path = write_log(history, tmp_path / "history.parquet")
    with pytest.raises(PrepareError, match=r"history\.parquet \(history\.logs\): 1 impressions at or after "
                                           r"the first split boundary"):
        run(config(log_path, items_path, tmp_path / "out", one_split(log), history={"logs": [str(hist_path)]}))


def test_a_multi_hot_action_column_gives_the_same_dataset(small, tmp_path):
    log, log_path, items_path = small
    bits = sum(log[a].astype(np.int64) << i for i, a in enumerate(ACTIONS))
    multi = {c: v for c, v in log.items() if c not in ACTIONS} | {"acts": bits}
    multi_path = write_log(multi, tmp_path / "multi.parquet")
    cfg = config(log_path, items_path, tmp_path / "columns", one_split(log), max_seq_len=7)
    run(cfg)
    columns = dict(cfg["columns"]) | {"actions": {a: None for a in ACTIONS}, "action_bits": "acts"}
    run(cfg | {"logs": [str(multi_path)], "out": str(tmp_path / "bits"), "columns": columns})
    files = sorted(p.relative_to(tmp_path / "columns") for p in (tmp_path / "columns").rglob("*.parquet"))
    assert files and files == sorted(p.relative_to(tmp_path / "bits") for p in (tmp_path / "bits").rglob("*.parquet"))
    for path in files:
        assert pq.read_table(tmp_path / "bits" / path).equals(pq.read_table(tmp_path / "columns" / path)), path
    # a value with a bit beyond the actions is refused, naming the file and column
    multi["acts"][4] = 8
    write_log(multi, multi_path)
    with pytest.raises(PrepareError, match=r"multi\.parquet: column 'acts' \(columns\.action_bits\) has 1 values "
                                           r"that are null or not a multi-hot of the 3 actions \(0\.\.7\)"):
        run(cfg | {"logs": [str(multi_path)], "out": str(tmp_path / "bad"), "columns": columns})
