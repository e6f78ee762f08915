"""Dense vocabularies, table sizes resolved against dataset.json, and the collision rate."""

from __future__ import annotations

import numpy as np
import pytest

from feedsr.data.vocab import (
    UNKNOWN_ID,
    apply_vocab,
    build_vocab,
    collision_rate,
    read_vocabs,
    table_sizes,
    vocab_size,
    write_vocabs,
)


def test_vocab_is_dense_ordered_and_maps_unseen_to_unknown():
    # KuaiRand-like author ids: large and sparse, seen several times.
    train = np.array([8_733_984, 7, 2_103_883, 7, 8_733_984])
    vocab = build_vocab(train)
    assert vocab_size(vocab) == 4
    np.testing.assert_array_equal(apply_vocab(vocab, train), [3, 1, 2, 1, 3])
    later = np.array([5, 2_103_883, 9_000_000, -1])  # unseen, seen, above all, below all
    np.testing.assert_array_equal(apply_vocab(vocab, later), [UNKNOWN_ID, 2, UNKNOWN_ID, UNKNOWN_ID])


def test_vocab_of_strings_and_of_nothing():
    vocab = build_vocab(np.array(["web", "camera", "web"]))
    np.testing.assert_array_equal(apply_vocab(vocab, np.array(["web", "camera", "app"])), [2, 1, 0])
    empty = build_vocab(np.array([], dtype=np.int64))
    assert vocab_size(empty) == 1
    np.testing.assert_array_equal(apply_vocab(empty, np.array([3, 4])), [UNKNOWN_ID, UNKNOWN_ID])


def test_vocab_ids_are_one_to_one_on_random_ids():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 10**9, 5000)
    ids = apply_vocab(build_vocab(raw), raw)
    assert ids.min() == 1 and ids.max() == len(np.unique(raw))
    pairs = np.unique(np.stack([raw, ids]), axis=1)  # distinct (raw, id) pairs
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_vocabs_round_trip_through_the_dataset_folder(tmp_path):
    vocabs = {"item_ids": [3, 10, 42], "cat_tag": ["1", "20"]}
    write_vocabs(tmp_path, vocabs)
    assert read_vocabs(tmp_path) == vocabs


META = {"source": "kuairand", "vocab_sizes": {"item_ids": 7491, "author_ids": 6447, "cat_tab": 16}}


def test_table_sizes_null_takes_the_vocabulary_and_an_int_overrides():
    got = table_sizes({"item_ids": None, "author_ids": 4096, "cat_tab": None}, META)
    assert got == {"item_ids": 7491, "author_ids": 4096, "cat_tab": 16}


def test_table_sizes_without_a_recorded_vocabulary_names_feature_and_file():
    with pytest.raises(ValueError, match=r"'cat_tag'.*dataset\.json.*kuairand"):
        table_sizes({"item_ids": None, "cat_tag": None}, META)
    with pytest.raises(ValueError, match=r"'item_ids'.*dataset\.json"):
        table_sizes({"item_ids": None}, {"source": "old"})  # made before vocab_sizes existed
    assert table_sizes({"item_ids": 100}, {"source": "old"}) == {"item_ids": 100}


def test_table_sizes_reject_bad_configured_sizes():
    for bad in (0, -3, 2.5, True, "8192"):
        with pytest.raises(ValueError, match=r"'item_ids'.*>= 1"):
            table_sizes({"item_ids": bad}, META)


def brute_force_collision_rate(vocab_size: int, table_size: int) -> float:
    rows = np.arange(vocab_size) % table_size
    per_row = np.bincount(rows, minlength=table_size)
    return float(np.mean(per_row[rows] > 1))


@pytest.mark.parametrize("vocab, table", [
    (1, 1), (5, 8), (8, 8), (9, 8), (16, 8), (17, 8), (23, 8), (100, 7), (6511, 8192),
    (6511, 4096), (6511, 1000), (7491, 8192), (3, 1), (2, 1),
])
def test_collision_rate_matches_brute_force(vocab, table):
    assert collision_rate(vocab, table) == pytest.approx(brute_force_collision_rate(vocab, table))


def test_collision_rate_examples_and_bad_sizes():
    assert collision_rate(6511, 8192) == 0.0  # dense authors fit a table of 8192 rows
    assert collision_rate(9, 8) == pytest.approx(2 / 9)  # ids 0 and 8 share row 0
    assert collision_rate(16, 8) == 1.0
    with pytest.raises(ValueError, match="table_size=0"):
        collision_rate(10, 0)
    with pytest.raises(ValueError, match="vocab_size=0"):
        collision_rate(0, 10)


def test_data_config_takes_table_sizes_from_the_dataset_and_reports_collisions():
    """null -> the dataset's vocabulary (one row per id); a smaller table is reported with its
    collision rate (KuaiRand's authors were hashed mod 8192 without notice)."""
    from feedsr.data.config import batch_spec, collision_report
    from feedsr.data.schema import DataError
    from feedsr.runtime.config import compose_config, to_config

    data = to_config(compose_config(["data=kuairand"])).data
    meta = {"vocab_sizes": {"item_ids": 7477, "author_ids": 6437, "cat_tab": 16, "cat_video_type": 4,
                            "cat_upload_type": 14, "cat_music_type": 6, "cat_tag": 44,
                            "cat_user_active_degree": 10}}
    spec = batch_spec(data, meta)
    assert spec.id_table_sizes == {k: meta["vocab_sizes"][k] for k in spec.id_table_sizes}
    assert collision_report(data, meta) == []
    data.id_tables["author_ids"] = 4096
    assert batch_spec(data, meta).id_table_sizes["author_ids"] == 4096
    (line,) = collision_report(data, meta)
    assert line.startswith("author_ids: 4096 table rows for 6437 ids: ")
    assert f"{collision_rate(6437, 4096):.1%} of them share a row" in line
    with pytest.raises(DataError, match="'item_ids': table size null means the dataset's vocabulary size"):
        batch_spec(data, {})
