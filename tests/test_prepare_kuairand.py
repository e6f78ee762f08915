"""The shipped KuaiRand prepare config (conf/prepare/kuairand.yaml) through the real pipeline, on a
slice of the real log: every context feature against a brute-force recomputation from the raw
slice, no leakage from labels at or after a time t, the vocabularies of the item table's computed
columns, a log given as a query, the features whose definition is shared with today's converter
(feedsr/data/kuairand.py) equal to its output, and the trainer reading and training on the result
(conf/data/kuairand_prepared.yaml).

The data is KuaiRand (Gao et al., CIKM 2022, CC BY-SA 4.0), read from the shared folder; only a
slice of the log is written to tmp_path. Without the data the tests skip locally; under CI=true
they fail (test_kuairand.py checks that mechanism).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose, tiny_overrides
from feedsr.data.reader import ReadSpec, ReaderConfig, SequenceReader, open_files, split_files
from feedsr.data.vocab import read_vocabs
from feedsr.prepare.config import compose_prepare_config, to_prepare_config
from feedsr.prepare.pipeline import run
from test_kuairand import targets

DATA = REPO.parent / "shared/data/kuairand"
LOG = DATA / "log_standard_20220425_to_20220505.parquet"
VIDEOS = DATA / "video_features_basic.parquet"
IN_CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.skipif(not DATA.is_dir() and not IN_CI, reason=f"KuaiRand data not found at {DATA}")

MEMBERS = 300
SPLITS = ("train", "valid")
ACTION_COLUMNS = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward", "is_hate",
                  "is_profile_enter")
LOCAL = ZoneInfo("Asia/Shanghai")


def test_data_is_present():
    """Under CI=true a missing copy of the data fails here instead of skipping silently."""
    assert DATA.is_dir(), f"KuaiRand data not found at {DATA} (required when CI=true)"


# ------------------------------------------------------------------ the slice and the pipeline


@pytest.fixture(scope="module")
def slice_path(tmp_path_factory) -> Path:
    """The log rows of the MEMBERS smallest user ids, every column, duplicates kept."""
    table = pq.read_table(LOG)
    members = np.unique(table["user_id"].to_numpy())[:MEMBERS]
    path = tmp_path_factory.mktemp("slice") / "log.parquet"
    pq.write_table(table.filter(pc.is_in(table["user_id"], pa.array(members))), path)
    return path


def prepare(log: Path | str, out: Path) -> dict:
    """The shipped config on ``log`` (a file or a query), run from the repo root as `make
    kuairand-prepared` runs it (its side-table paths are relative)."""
    cfg = compose_prepare_config(["prepare=kuairand", f"prepare.out={out}", "prepare.engine.threads=1"])
    cfg.prepare.logs = [str(log)]  # set, not a Hydra override: a query holds quotes and commas
    with contextlib.chdir(REPO):
        return run(cfg)


@pytest.fixture(scope="module")
def prepared(slice_path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(slice_path, out)


@pytest.fixture(scope="module")
def raw(slice_path) -> dict[str, np.ndarray]:
    """The slice deduplicated by numpy, with each row's author_id and upload_dt."""
    table = pq.read_table(slice_path)
    matrix = np.stack([table[c].to_numpy() for c in table.column_names], axis=1)
    rows = np.unique(matrix, axis=0)
    cols = {c: rows[:, i] for i, c in enumerate(table.column_names)}
    videos = pq.read_table(VIDEOS).to_pydict()
    author_of = dict(zip(videos["video_id"], videos["author_id"]))
    upload_of = dict(zip(videos["video_id"], videos["upload_dt"]))
    assert all(author_of.get(v) is not None for v in cols["video_id"].tolist())  # every video has an author
    cols["author_id"] = np.array([author_of[v] for v in cols["video_id"].tolist()])
    cols["upload_dt"] = np.array([upload_of[v] for v in cols["video_id"].tolist()], dtype=object)
    return cols


# ------------------------------------------------------------------ brute force


def priors() -> dict[str, tuple[float, float]]:
    """(prior_rate, prior_strength) of each feature of the shipped config."""
    cfg = to_prepare_config(compose_prepare_config(["prepare=kuairand"]))
    return {f.name: (f.prior_rate, f.prior_strength) for f in cfg.features}


def expected_context(raw: dict, row: int, prior: dict) -> dict[str, float]:
    """Every context feature of ``raw[row]``, counting only events with a smaller time_ms."""
    t_ms = raw["time_ms"][row]
    earlier = raw["time_ms"] < t_ms
    video = earlier & (raw["video_id"] == raw["video_id"][row])
    author = earlier & (raw["author_id"] == raw["author_id"][row])
    pair = author & (raw["user_id"] == raw["user_id"][row])

    def rate(name: str, where: np.ndarray, column: str) -> float:
        p, s = prior[name]
        return ((raw[column][where] != 0).sum() + s * p) / (where.sum() + s)

    upload = raw["upload_dt"][row]
    if upload is None:
        age = -1.0
    else:
        midnight = datetime.strptime(upload, "%Y-%m-%d").replace(tzinfo=LOCAL).timestamp()
        age = max(0.0, (t_ms / 1000 - midnight) / 86_400)
    return {
        "log_duration": np.log1p(raw["duration_ms"][row] / 1000),  # the log's own duration
        "video_log_imps": np.log1p(video.sum()),
        "video_click_rate": rate("video_click_rate", video, "is_click"),
        "video_long_view_rate": rate("video_long_view_rate", video, "long_view"),
        "video_like_rate": rate("video_like_rate", video, "is_like"),
        "author_log_imps": np.log1p(author.sum()),
        "author_click_rate": rate("author_click_rate", author, "is_click"),
        "member_author_log_imps": np.log1p(pair.sum()),
        "member_author_log_clicks": np.log1p((raw["is_click"][pair] != 0).sum()),
        "post_age_days": age,
    }


# ------------------------------------------------------------------ output vs raw, by key


def raw_keys(raw: dict, known_items: set) -> list[tuple]:
    """(member, second, video or None): what identifies an impression in the output, where a
    video unseen in training has lost its raw id (dense id 0)."""
    return [(u, t // 1000, v if v in known_items else None)
            for u, t, v in zip(raw["user_id"].tolist(), raw["time_ms"].tolist(), raw["video_id"].tolist())]


def output_by_key(out: Path, context: list[str]) -> dict[tuple, list[tuple]]:
    """Every target impression's context vector, grouped by key (see ``raw_keys``)."""
    vocab = read_vocabs(out)["item_ids"]
    grouped = defaultdict(list)
    for name in SPLITS:
        got = targets(out, name)
        for i in range(len(got["member_id"])):
            item = int(got["item_ids"][i])
            key = (int(got["member_id"][i]), int(got["timestamps"][i]), vocab[item - 1] if item else None)
            grouped[key].append(tuple(float(got[f"ctx_{c}"][i]) for c in context))
    return grouped


def same_vectors(a: list[tuple], b: list[tuple]) -> bool:
    """Equal multisets of float vectors, up to float32 rounding."""
    if len(a) != len(b):
        return False
    order = lambda vs: sorted(vs, key=lambda v: tuple(round(x, 4) for x in v))  # noqa: E731
    return all(np.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(order(a), order(b)))


def test_context_equals_brute_force(raw, prepared):
    """Every impression of the slice is a target once, with every context feature equal to its
    brute-force value; the names are the converter's (plus nothing)."""
    out, meta = prepared
    from feedsr.data.kuairand import CONTEXT_NAMES

    assert sorted(meta["context"]) == sorted(CONTEXT_NAMES)
    prior = priors()
    keys = raw_keys(raw, set(read_vocabs(out)["item_ids"]))
    expected = defaultdict(list)
    for row, key in enumerate(keys):
        values = expected_context(raw, row, prior)
        expected[key].append(tuple(values[c] for c in meta["context"]))
    got = output_by_key(out, meta["context"])
    assert got.keys() == expected.keys()
    bad = [k for k in expected if not same_vectors(got[k], expected[k])]
    assert not bad, (len(bad), bad[:3], got[bad[0]], expected[bad[0]])
    assert sum(meta["splits"][s]["targets"] for s in SPLITS) == len(keys)
    # the brute force is not trivial: every feature varies, pairs repeat, ties in time, unknown videos
    values = np.array([v for vs in expected.values() for v in vs])
    assert all(len(np.unique(column)) >= 2 for column in values.T)
    assert (values[:, meta["context"].index("member_author_log_clicks")] > 0).any()
    assert len(np.unique(raw["time_ms"])) < len(raw["time_ms"])
    assert None in {k[2] for k in keys}


def test_labels_at_or_after_t_change_no_feature_up_to_t(raw, slice_path, prepared, tmp_path):
    """Flip every action of the events at time >= t (t a time shared by several events): no
    impression at time <= t changes a feature, and later ones do."""
    out, meta = prepared
    times, counts = np.unique(raw["time_ms"], return_counts=True)
    tied = times[counts > 1]
    t = tied[np.argmin(np.abs(tied - np.median(raw["time_ms"])))]
    table = pq.read_table(slice_path)
    later = pc.greater_equal(table["time_ms"], pa.scalar(int(t)))
    for column in ACTION_COLUMNS:
        table = table.set_column(table.column_names.index(column), column,
                                 pc.if_else(later, pc.subtract(1, table[column]), table[column]))
    pq.write_table(table, tmp_path / "flipped.parquet")
    prepare(tmp_path / "flipped.parquet", tmp_path / "flipped")
    a, b = output_by_key(out, meta["context"]), output_by_key(tmp_path / "flipped", meta["context"])
    when = defaultdict(list)
    for key, t_ms in zip(raw_keys(raw, set(read_vocabs(out)["item_ids"])), raw["time_ms"].tolist()):
        when[key].append(t_ms)
    up_to_t = [k for k, ts in when.items() if max(ts) <= t]
    after_t = [k for k, ts in when.items() if min(ts) > t]
    assert len(up_to_t) > 500 and len(after_t) > 500
    assert all(same_vectors(a[k], b[k]) for k in up_to_t)
    assert sum(not same_vectors(a[k], b[k]) for k in after_t) > 50


def test_shared_features_equal_the_converter_on_the_same_slice(slice_path, prepared, tmp_path):
    """Today's converter (feedsr/data/kuairand.py, with pre-window history as `make kuairand`) on
    the same slice: the same rows, targets and history, and every feature but the rates equal; the
    rates differ only by their prior."""
    from feedsr.data import kuairand

    out, meta = prepared
    src = tmp_path / "src"
    src.mkdir()
    (src / kuairand.LOG_FILE).symlink_to(slice_path)
    for name in (kuairand.VIDEO_FILE, kuairand.USER_FILE, kuairand.HISTORY_FILE):
        (src / name).symlink_to(DATA / name)
    converted = kuairand.convert(src, tmp_path / "converted", train_end=20220502, valid_end=20220505,
                                 pre_history=True)
    assert converted["splits"] == meta["splits"]  # rows, members, targets and impressions (history included)
    assert converted["duplicates_dropped"] == meta["duplicates_dropped"]
    assert converted["pre_history_impressions"] == meta["history_impressions"] > 0
    assert read_vocabs(tmp_path / "converted")["item_ids"] == read_vocabs(out)["item_ids"]
    shared = [c for c in meta["context"] if not c.endswith("_rate")]
    assert len(shared) == 6
    ours, theirs = output_by_key(out, shared), output_by_key(tmp_path / "converted", shared)
    assert ours.keys() == theirs.keys()
    assert all(same_vectors(ours[k], theirs[k]) for k in ours)


def test_a_query_over_the_full_log_gives_the_sliced_dataset(prepared, tmp_path):
    """A log given as a DuckDB query that keeps the slice's members equals the sliced copy."""
    out, meta = prepared
    last = int(np.unique(pq.read_table(LOG, columns=["user_id"])["user_id"].to_numpy())[MEMBERS - 1])
    again = prepare(f"SELECT * FROM '{LOG}' WHERE user_id <= {last}", tmp_path / "query")
    assert again["splits"] == meta["splits"] and again["vocab_sizes"] == meta["vocab_sizes"]
    assert read_vocabs(tmp_path / "query") == read_vocabs(out)
    ours, theirs = output_by_key(out, meta["context"]), output_by_key(tmp_path / "query", meta["context"])
    assert ours.keys() == theirs.keys() and all(same_vectors(ours[k], theirs[k]) for k in ours)


def test_item_table_query_columns(raw, prepared):
    """The item table's computed columns: the first tag as a categorical, the upload time as
    item_age's creation time (checked above), the video vocabulary of the training window."""
    out, meta = prepared
    vocabs = read_vocabs(out)
    train = raw["time_ms"] // 1000 < meta["splits"]["train"]["end"]
    tags = pq.read_table(VIDEOS).to_pydict()
    first_tag = {v: (t.split(",")[0] if t is not None else None) for v, t in zip(tags["video_id"], tags["tag"])}
    history = pq.read_table(DATA / "user_history_until_20220424_last50.parquet").to_pydict()
    members = set(raw["user_id"].tolist())
    watched = {v for u, seq in zip(history["user_id"], history["watch_seq"]) if u in members
               for v in seq}  # the members' pre-window history is in the training window too
    videos = set(raw["video_id"][train].tolist()) | watched
    seen = {first_tag.get(v) for v in videos} - {None}
    assert vocabs["cat_tag"] == sorted(seen) and all("," not in t for t in seen)
    assert vocabs["item_ids"] == sorted(videos)
    assert meta["splits"]["train"]["start"] == datetime(2022, 4, 24, tzinfo=LOCAL).timestamp()
    assert meta["splits"]["valid"]["end"] == datetime(2022, 5, 6, tzinfo=LOCAL).timestamp()


def train_config(out: Path, runs: Path) -> dict:
    overrides = ["data=kuairand_prepared", *tiny_overrides(out, runs, "kuairand_prepared"),
                 "trainer.max_steps=2", "trainer.checkpoint_every=0"]
    return OmegaConf.to_container(compose(overrides), resolve=True)


def test_reader_validates_and_trainer_trains(prepared, tmp_path):
    """The data config names what the pipeline wrote; the reader validates every row group of
    both splits; the real trainer takes 2 steps with tables sized by the vocabularies."""
    from feedsr.train.trainer import run as train

    out, meta = prepared
    cfg = train_config(out, tmp_path / "runs")
    data = cfg["data"]
    assert data["context"] == meta["context"]
    assert list(data["categorical"]) == meta["categorical"]
    assert data["action_names"] == meta["action_names"]
    spec = ReadSpec(tuple(data["action_names"]), tuple(data["categorical"]), tuple(data["context"]))
    for name in SPLITS:
        files = open_files(split_files(out, name), spec)
        reader = SequenceReader(files, spec, ReaderConfig(batch_size=128, max_seq_len=meta["max_seq_len"]))
        assert sum(len(block) for block in reader) == meta["splits"][name]["rows"]
    result = train(cfg)
    assert result.step == 2 and all(np.isfinite(result.losses))
