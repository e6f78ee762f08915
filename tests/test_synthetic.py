"""The synthetic generator and its dataset (the simulated log through feedsr.prepare):
determinism, the on-disk schema, the planted effects, and the benchmark world
(feedsr/conf/data/synthetic_bench.yaml): long histories and history effects at three time
scales, each of which the oracle needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from feedsr.data.schema import SEQUENCE_COLUMNS, check_schema, file_action_names
from feedsr.data.sequences import read_dataset_meta
from feedsr.data.synthetic import (
    ACTION_NAMES,
    HISTORY_TERMS,
    LATENTS_FILE,
    LOG_FILE,
    SyntheticConfig,
    load_targets,
    probs_without,
    write_log,
)
from feedsr.data.vocab import read_vocabs
from feedsr.data.tasks import decode_actions
from feedsr.eval.metrics import roc_auc
from feedsr.prepare.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]

NUM_MEMBERS = 2000
MAX_SEQ_LEN = 64  # below the longest histories, so members get several windows
SPLITS = ("train", "valid", "test")
LOG_COLUMNS = [
    "member_id", "timestamps", "item_ids", "author_ids", "positions", "action_bits",
    "ctx_author_affinity", "ctx_post_age",
] + [f"true_{a}" for a in ACTION_NAMES] + [f"dense_content_{i}" for i in range(SyntheticConfig().dim)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, NUM_MEMBERS, seed=0, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def log(dataset):
    return full_log(dataset[0])


def full_log(data_dir) -> dict[str, np.ndarray]:
    """The flat impression log, rebuilt from the targets of all splits (each impression is a
    target of exactly one split), sorted by (member, time)."""
    parts = [load_targets(data_dir, split, LOG_COLUMNS) for split in SPLITS]
    merged = {c: np.concatenate([p[c] for p in parts]) for c in LOG_COLUMNS}
    order = np.lexsort((merged["timestamps"], merged["member_id"]))
    return {c: v[order] for c, v in merged.items()}


def action(log, name: str) -> np.ndarray:
    return decode_actions(log["action_bits"], len(ACTION_NAMES))[:, ACTION_NAMES.index(name)]


def raw_log(data_dir) -> dict[str, np.ndarray]:
    """The simulated flat log itself (raw post and author ids), sorted by (member, time)."""
    table = pq.read_table(data_dir / LOG_FILE)
    log = {c: table[c].to_numpy() for c in table.column_names}
    order = np.lexsort((log["timestamp"], log["member_id"]))
    return {c: v[order] for c, v in log.items()}


def split_tables(data_dir, split: str):
    return [pq.read_table(f) for f in sorted((data_dir / split).glob("part-*.parquet"))]


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_tables_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", 500, seed=7, max_seq_len=32)
    b = generate(tmp_path / "b", 500, seed=7, max_seq_len=32)
    c = generate(tmp_path / "c", 500, seed=8, max_seq_len=32)
    assert a == b
    for split in SPLITS:
        ta, tb = split_tables(tmp_path / "a", split), split_tables(tmp_path / "b", split)
        assert len(ta) == len(tb) and all(x.equals(y) for x, y in zip(ta, tb))
    assert not split_tables(tmp_path / "a", "train")[0].equals(
        split_tables(tmp_path / "c", "train")[0]
    )
    assert a["splits"] != c["splits"]


# --- schema --------------------------------------------------------------------------------


def test_metadata(dataset):
    out, meta = dataset
    assert read_dataset_meta(out) == meta
    assert meta["source"] == "synthetic"
    assert meta["action_names"] == list(ACTION_NAMES)
    assert meta["categorical"] == ["post_type", "surface"]
    assert meta["true_probs"] == list(ACTION_NAMES)
    assert meta["dense"] == SyntheticConfig().content_columns
    assert meta["num_members"] == NUM_MEMBERS and meta["max_seq_len"] == MAX_SEQ_LEN
    assert SyntheticConfig(**meta["config"]) == SyntheticConfig()  # the config round-trips
    assert set(meta["splits"]) == set(SPLITS)
    latents = np.load(out / LATENTS_FILE)
    # Ids get vocabularies from the training window, as any log's: 0 = unknown, 1..V known.
    vocabs = read_vocabs(out)
    assert meta["vocab_sizes"] == {column: len(values) + 1 for column, values in vocabs.items()}
    raw = raw_log(out)
    train = raw["timestamp"] < meta["splits"]["train"]["end"]
    assert vocabs["item_ids"] == sorted(set(raw["post_id"][train].tolist()))
    assert set(vocabs["item_ids"]) <= set(range(len(latents["post_vec"])))
    assert vocabs["author_ids"] == sorted(set(raw["author_id"][train].tolist()))
    assert vocabs["cat_post_type"] == list(range(8)) and vocabs["cat_surface"] == list(range(3))
    assert latents["post_vec"].shape[1] == SyntheticConfig().dim
    assert latents["member_vec"].shape[0] == NUM_MEMBERS


def test_files_match_the_schema(dataset):
    out, meta = dataset
    expected = {c.name for c in SEQUENCE_COLUMNS}
    expected |= {f"cat_{n}" for n in meta["categorical"]}
    expected |= {f"dense_{n}" for n in meta["dense"]}
    expected |= {f"ctx_{n}" for n in meta["context"]}
    expected |= {f"true_{n}" for n in meta["true_probs"]}
    for split in SPLITS:
        files = sorted((out / split).glob("part-*.parquet"))
        assert files
        rows = targets = 0
        for path in files:
            schema = pq.read_schema(path)
            assert set(schema.names) == expected
            check_schema(path, schema, sorted(expected))
            assert file_action_names(schema) == list(ACTION_NAMES)
            table = pq.read_table(path)
            lengths = pc.list_value_length(table["item_ids"]).to_numpy()
            num_targets = table["num_targets"].to_numpy()
            assert np.all((num_targets >= 1) & (num_targets <= lengths))
            assert lengths.max() <= MAX_SEQ_LEN
            for name in expected - {"member_id", "num_targets"}:
                assert np.array_equal(pc.list_value_length(table[name]).to_numpy(), lengths)
            for name, size in meta["vocab_sizes"].items():
                ids = pc.list_flatten(table[name]).to_numpy()
                assert ids.min() >= 0 and ids.max() < size, (path, name)
            rows, targets = rows + len(table), targets + int(num_targets.sum())
        assert (rows, targets) == (meta["splits"][split]["rows"], meta["splits"][split]["targets"])


def test_splits_are_in_time_order(dataset):
    out, meta = dataset
    target_times = {s: load_targets(out, s, ["timestamps"])["timestamps"] for s in SPLITS}
    for split in SPLITS:
        bounds = meta["splits"][split]
        assert bounds["start"] <= target_times[split].min()
        assert target_times[split].max() < bounds["end"]
    for earlier, later in zip(SPLITS, SPLITS[1:]):
        assert target_times[earlier].max() < target_times[later].min()


def test_rows_are_time_sorted_and_every_impression_is_one_target(dataset, log):
    out, meta = dataset
    for table in split_tables(out, "test"):
        for row in table["timestamps"].to_pylist():
            assert np.all(np.diff(row) > 0)
    key = log["member_id"] * 10**10 + log["timestamps"]
    assert len(np.unique(key)) == len(key)  # no impression is a target twice
    assert len(np.unique(log["member_id"])) == NUM_MEMBERS  # every member is somewhere


def test_context_is_point_in_time(dataset, log):
    assert np.all(log["ctx_post_age"] >= 0)  # never a post created after the impression
    # Author affinity counts clicks on the author (raw ids: authors unseen in training share the
    # dense id 0) in strictly earlier impressions only; impressions are unique per (member, time).
    raw = raw_log(dataset[0])
    assert np.array_equal(raw["member_id"], log["member_id"]) and np.array_equal(raw["timestamp"], log["timestamps"])
    clicks, authors = raw["click"].astype(bool), raw["author_id"]
    for m in np.unique(log["member_id"])[:200]:
        rows = np.flatnonzero(log["member_id"] == m)
        earlier = [np.sum(clicks[rows[:k]] & (authors[rows[:k]] == authors[i]))
                   for k, i in enumerate(rows)]
        np.testing.assert_allclose(log["ctx_author_affinity"][rows], np.log1p(earlier), rtol=1e-6)
    np.testing.assert_allclose(log["ctx_post_age"], raw["post_age"])  # passed through as logged


def test_bad_parameters_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="seq_decay.*1.5"):
        generate(tmp_path, 10, seed=0, seq_decay=1.5)
    with pytest.raises(ValueError, match="no_such_knob"):
        generate(tmp_path, 10, seed=0, no_such_knob=1)
    with pytest.raises(ValueError, match="num_members.*0"):
        generate(tmp_path, 0, seed=0)
    with pytest.raises(ValueError, match="action_biases"):
        SyntheticConfig(action_biases=(0.0, 1.0))
    with pytest.raises(ValueError, match="dim must be int.*'8'"):
        SyntheticConfig(dim="8")
    with pytest.raises(ValueError, match="fatigue_decay.*1.0"):
        SyntheticConfig(fatigue_decay=1.0)
    with pytest.raises(ValueError, match="long_scale.*-1"):
        SyntheticConfig(long_scale=-1.0)
    with pytest.raises(ValueError, match="5000 impressions .* do not fit in num_days=30"):
        SyntheticConfig(max_impressions=5000)  # 5000 gaps of up to 600 s are 35 days
    SyntheticConfig(max_impressions=1000)  # fits: the session gap is reserved per session


# --- planted effects -----------------------------------------------------------------------


def test_click_rate_falls_with_feed_position(log):
    clicks, positions = action(log, "click"), log["positions"]
    assert clicks[positions == 0].mean() > 1.5 * clicks[positions >= 5].mean()


def recent_similar_click_lift(data_dir) -> float:
    """Click rate after a click on a similar post (cosine > 0.7) in the member's last 3
    impressions, over the rate after a click on dissimilar posts only (cosine < 0.2)."""
    log = raw_log(data_dir)
    post_vec = np.load(data_dir / LATENTS_FILE)["post_vec"][log["post_id"]]
    clicks, member = log["click"].astype(bool), log["member_id"]
    similar = np.zeros(len(clicks), dtype=bool)
    dissimilar = np.zeros(len(clicks), dtype=bool)
    for lag in (1, 2, 3):
        clicked_before = np.zeros(len(clicks), dtype=bool)
        clicked_before[lag:] = (member[lag:] == member[:-lag]) & clicks[:-lag]
        cosine = np.zeros(len(clicks))
        cosine[lag:] = np.einsum("nd,nd->n", post_vec[lag:], post_vec[:-lag])
        similar |= clicked_before & (cosine > 0.7)
        dissimilar |= clicked_before & (cosine < 0.2)
    return clicks[similar].mean() / clicks[dissimilar & ~similar].mean()


def test_recent_similar_engagement_raises_engagement(dataset, tmp_path):
    # Static member-topic affinity alone also makes similar clicks cluster, so compare against
    # the same world with the sequential term switched off.
    with_history = recent_similar_click_lift(dataset[0])
    generate(tmp_path, NUM_MEMBERS, seed=0, max_seq_len=MAX_SEQ_LEN, seq_scale=0.0)
    without = recent_similar_click_lift(tmp_path)
    assert with_history > 1.5
    assert with_history > without + 0.4


def test_true_probabilities_match_the_labels(log):
    for name in ACTION_NAMES:
        p, y = log[f"true_{name}"].astype(np.float64), action(log, name)
        # Labels are independent Bernoulli(p): the count's std is sqrt(sum p(1-p)).
        sigma = np.sqrt(np.sum(p * (1 - p)))
        assert abs(y.sum() - p.sum()) < 4 * sigma, name
    # And along the probability scale, not just on average.
    p, y = log["true_click"].astype(np.float64), action(log, "click")
    edges = np.quantile(p, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (p >= lo) & (p <= hi)
        assert abs(y[in_bin].mean() - p[in_bin].mean()) < 0.02


def test_rare_actions_are_rare_but_present(log):
    rates = {name: action(log, name).mean() for name in ACTION_NAMES}
    assert 0.2 < rates["click"] < 0.4
    assert 0.12 < rates["long_view"] < 0.28
    for rare in ("comment", "share"):
        assert 0 < rates[rare] < 0.02
        assert action(log, rare).sum() >= 100
    assert rates["click"] > rates["like"] > rates["comment"]


# --- the benchmark world: history at three time scales ------------------------------------

BENCH_MEMBERS = 2000


def bench_params(**overrides) -> dict:
    """The generator parameters of feedsr/conf/data/synthetic_bench.yaml (without its size)."""
    generate = OmegaConf.to_container(OmegaConf.load(ROOT / "feedsr/conf/data/synthetic_bench.yaml").generate)
    del generate["num_members"], generate["seed"]
    return {**generate, **overrides}


def simulate(out, num_members: int, **params):
    """(config, raw log sorted by (member, time), latents) of a simulated log."""
    sim = write_log(out, num_members, seed=0, **params)
    return sim.config, raw_log(out), np.load(sim.latents_path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("bench"), BENCH_MEMBERS, **bench_params())


def click_auc(probs: np.ndarray, log) -> float:
    return roc_auc(probs, log["click"].astype(bool))


def test_every_history_effect_is_needed_by_the_oracle(bench):
    cfg, log, _ = bench
    full = click_auc(log["true_click"], log)
    for term in HISTORY_TERMS:
        without = click_auc(probs_without(log, cfg, [term])[:, 0], log)
        assert full - without > 0.004, (term, full, without)  # ~0.037 seq, 0.009 long, 0.007 fatigue


def test_the_oracle_without_history_stays_below_the_full_oracle(bench):
    cfg, log, _ = bench
    full = click_auc(log["true_click"], log)
    assert full - click_auc(probs_without(log, cfg, HISTORY_TERMS)[:, 0], log) > 0.03  # ~0.05


def test_removing_nothing_or_a_switched_off_term_changes_nothing(bench, dataset):
    cfg, log, _ = bench
    true = np.stack([log[f"true_{a}"] for a in ACTION_NAMES], axis=1)
    np.testing.assert_allclose(probs_without(log, cfg, []), true, rtol=1e-5, atol=1e-9)
    # The default world has neither the long-range state nor fatigue.
    default = raw_log(dataset[0])
    assert not default["term_long"].any() and not default["term_fatigue"].any()
    true = np.stack([default[f"true_{a}"] for a in ACTION_NAMES], axis=1)
    np.testing.assert_allclose(probs_without(default, SyntheticConfig(), ["long", "fatigue"]), true,
                               rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="unknown history term.*'boredom'"):
        probs_without(log, cfg, ["boredom"])


def reference_terms(cfg: SyntheticConfig, log, post_vec: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The history terms of one member's impressions ``rows`` (time order), one at a time as
    the module docstring states them: the plain reference of the vectorized walk."""
    engaged, active, seen = np.zeros(cfg.dim), np.zeros(cfg.dim), np.zeros(cfg.dim)
    active_weight = 0.0
    out = []
    for i in rows:
        v = post_vec[log["post_id"][i]]
        long = active @ v / active_weight if active_weight > 0 else 0.0
        out.append([cfg.seq_scale * engaged @ v, cfg.long_scale * long,
                    -cfg.fatigue_scale * max(seen @ v - cfg.fatigue_threshold, 0.0)])
        is_active = any(log[a][i] for a in ("like", "comment", "share"))
        engaged = cfg.seq_decay * engaged + (log["click"][i] or log["like"][i]) * v
        active = cfg.long_decay * active + is_active * v
        active_weight = cfg.long_decay * active_weight + is_active
        seen = cfg.fatigue_decay * seen + v
    return np.array(out)


def test_history_terms_follow_the_model(bench):
    cfg, log, latents = bench
    counts = np.bincount(log["member_id"])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    longest = np.argsort(-counts, kind="stable")[:3]  # members at the 1000-impression cap
    for m in [*longest, *range(20)]:
        rows = np.arange(starts[m], starts[m] + counts[m])
        logged = np.stack([log[f"term_{t}"][rows] for t in HISTORY_TERMS], axis=1)
        np.testing.assert_allclose(logged, reference_terms(cfg, log, latents["post_vec"], rows),
                                   rtol=1e-4, atol=1e-5, err_msg=f"member {m}")


def streak_click_gap(log, post_vec: np.ndarray) -> float:
    """Click rate right after two impressions of the post's topic (cosine > 0.5, lags 1 and 2)
    minus the rate when the same two came 8 and 9 impressions earlier (and none of the last
    three): the same history in another order."""
    member, vec = log["member_id"], post_vec[log["post_id"]]

    def similar_at(lag: int) -> np.ndarray:
        out = np.zeros(len(member), dtype=bool)
        cosine = np.einsum("nd,nd->n", vec[lag:], vec[:-lag])
        out[lag:] = (member[lag:] == member[:-lag]) & (cosine > 0.5)
        return out

    recent = similar_at(1) & similar_at(2)
    earlier = similar_at(8) & similar_at(9) & ~similar_at(1) & ~similar_at(2) & ~similar_at(3)
    assert recent.sum() > 1000 and earlier.sum() > 1000
    clicks = log["click"].astype(bool)
    return clicks[recent].mean() - clicks[earlier].mean()


def test_fatigue_depends_on_the_order_of_the_history(bench, tmp_path):
    # Without fatigue, recent same-topic posts raise clicks (the engagement state); with it they
    # lower them, while the same posts further back do not weigh.
    _, log, latents = bench
    with_fatigue = streak_click_gap(log, latents["post_vec"])
    _, log_off, latents_off = simulate(tmp_path, BENCH_MEMBERS, **bench_params(fatigue_scale=0.0))
    without = streak_click_gap(log_off, latents_off["post_vec"])
    assert with_fatigue < -0.03 and without > 0.03, (with_fatigue, without)  # ~-0.075, ~+0.06


def check_timeline(cfg: SyntheticConfig, log) -> None:
    """Timestamps strictly increase within a member and stay in the window; a new session (feed
    position 0) starts at least min_session_gap_s after the last impression, and impressions
    inside a session are at most max_within_gap_s apart."""
    t, member, position = log["timestamp"], log["member_id"], log["position"]
    assert t.min() >= cfg.start_time and t.max() < cfg.start_time + cfg.window_s
    same = member[1:] == member[:-1]
    gap, opens = np.diff(t)[same], position[1:][same] == 0
    assert np.all(gap > 0)
    assert np.all(gap[opens] >= cfg.min_session_gap_s)
    assert np.all(gap[~opens] <= cfg.max_within_gap_s)


def test_benchmark_histories_are_skewed_up_to_1000(bench):
    cfg, log, _ = bench
    counts = np.bincount(log["member_id"], minlength=BENCH_MEMBERS)
    assert counts.min() >= 10 and counts.max() == 1000
    assert (counts == 1000).sum() >= 10  # ~1.2% of members
    assert np.median(counts) < 150  # ~107
    check_timeline(cfg, log)


def test_sessions_fit_even_when_every_impression_opens_one(tmp_path):
    # Each impression its own session: 1000 hour-long gaps exceed 30 days, so a member's
    # sessions stop at max_sessions and the rest join the last one.
    cfg, log, _ = simulate(tmp_path, 20, session_mean_len=1.0, min_impressions=1000, max_impressions=1000)
    assert cfg.max_sessions == 553
    sessions = np.bincount(log["member_id"], weights=log["position"] == 0)
    assert np.all(sessions == cfg.max_sessions)
    check_timeline(cfg, log)


def test_content_columns_are_the_post_vectors(dataset, tmp_path):
    cfg = SyntheticConfig()
    log, latents = raw_log(dataset[0]), np.load(dataset[0] / LATENTS_FILE)
    content = np.stack([log[c] for c in cfg.content_columns], axis=1)
    assert content.dtype == np.float32 and content.shape[1] == cfg.dim
    np.testing.assert_array_equal(content, latents["post_vec"][log["post_id"]].astype(np.float32))
    # ... and reach the dataset as the dense feature family, impression by impression.
    dataset_log = full_log(dataset[0])
    assert np.array_equal(dataset_log["timestamps"], log["timestamp"])
    dense = np.stack([dataset_log[f"dense_{c}"] for c in cfg.content_columns], axis=1)
    np.testing.assert_array_equal(dense, content)

    noisy_cfg, noisy, noisy_latents = simulate(tmp_path, NUM_MEMBERS, content_noise=0.1)
    noisy_content = np.stack([noisy[c] for c in noisy_cfg.content_columns], axis=1)
    # A post's embedding is blurred once: every impression of it shows the same numbers.
    np.testing.assert_array_equal(noisy_content, noisy_latents["post_content"][noisy["post_id"]])
    residual = noisy_content - noisy_latents["post_vec"][noisy["post_id"]]
    assert 0.09 < residual.std() < 0.11
    # The noise is drawn last: the world itself is the same as without it.
    np.testing.assert_array_equal(noisy["true_click"], log["true_click"])


# --- the script -----------------------------------------------------------------------------


def test_make_synthetic_prints_the_oracle_auc_of_the_test_split(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "scripts/make_synthetic.py"), "--out", str(out),
           "--num-members", "400", "--seed", "1", "--max-seq-len", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    meta = read_dataset_meta(out)
    assert f"{meta['vocab_sizes']['item_ids']} post ids" in done.stdout
    test = load_targets(out, "test", ["action_bits"] + [f"true_{a}" for a in ACTION_NAMES])
    labels = decode_actions(test["action_bits"], len(ACTION_NAMES))
    oracle = [roc_auc(test[f"true_{a}"], labels[:, i]) for i, a in enumerate(ACTION_NAMES)]
    lines = {x[:46].strip(): [float(v) for v in x[46:].split()] for x in done.stdout.splitlines()
             if x.startswith("test: oracle AUC")}
    np.testing.assert_allclose(lines["test: oracle AUC"], oracle, atol=5e-5)
    assert 0.6 < oracle[0] < 1.0  # the click oracle ranks well: the AUC is not a constant
    # Default data has only the short-term state: taking out the others changes nothing.
    np.testing.assert_allclose(lines["test: oracle AUC, no long"], oracle, atol=5e-5)
    np.testing.assert_allclose(lines["test: oracle AUC, no fatigue"], oracle, atol=5e-5)
    assert lines["test: oracle AUC, no seq"][0] < oracle[0] - 0.01
    assert lines["test: oracle AUC, no history"] == lines["test: oracle AUC, no seq"]


def test_make_synthetic_generates_a_data_configs_world(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts/make_synthetic.py"), "--data", "synthetic_bench",
           "--out", str(out), "--num-members", "300", "--max-seq-len", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    meta = read_dataset_meta(out)
    assert meta["num_members"] == 300 and meta["max_seq_len"] == 64  # the flags override the config
    assert SyntheticConfig(**meta["config"]) == SyntheticConfig(**bench_params())
    lines = {x[:46].strip(): [float(v) for v in x[46:].split()] for x in done.stdout.splitlines()
             if x.startswith("test: oracle AUC")}
    assert lines["test: oracle AUC, no history"][0] < lines["test: oracle AUC"][0] - 0.02


def test_generation_never_writes_over_a_users_files(tmp_path):
    """data.path pointing at one's own Parquet files without a dataset.json used to regenerate
    synthetic data into the directory, overwriting and deleting the user's files."""
    from feedsr.data.output import OWNER_MARK
    from feedsr.data.schema import DataError
    from feedsr.runtime.config import compose_config, to_config
    from feedsr.train.trainer import run

    users = tmp_path / "mine"
    (users / "train").mkdir(parents=True)
    part = users / "train" / "part-00000-1b2c-c000.snappy.parquet"
    part.write_bytes(b"PAR1 a user's bytes PAR1")
    (users / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in users.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"mine: refusing to write a dataset into a directory feedsr did "
                                        r"not create \(it holds notes.txt, train\)"):
        run(to_config(compose_config([f"data.path={users}", "data.generate.num_members=50",
                                      f"output_root={tmp_path}"])))
    with pytest.raises(DataError, match="refusing to write"):
        generate(users, num_members=50, seed=0)
    assert {p: p.read_bytes() for p in users.rglob("*") if p.is_file()} == before  # nothing touched
    # an empty directory, or one feedsr marked (an interrupted generation), is written
    (tmp_path / "empty").mkdir()
    assert generate(tmp_path / "empty", num_members=50, seed=0)["num_members"] == 50
    (tmp_path / "empty" / "dataset.json").unlink()  # as if killed before the end
    assert (tmp_path / "empty" / OWNER_MARK).is_file()
    assert generate(tmp_path / "empty", num_members=50, seed=0)["num_members"] == 50
