"""The reader splits rows over ranks and workers with no overlap, no gap and equal batch counts."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import ACTIONS, SPEC
from feedsr.data.reader import (
    ReaderConfig,
    SequenceReader,
    batch_sizes,
    open_files,
    split_files,
)
from feedsr.data.schema import DataError


def epoch_batches(split_dir, world_size, rank, num_workers, epoch=0, skip=0, **cfg):
    files = open_files(split_files(split_dir.parent, split_dir.name), SPEC)
    reader = SequenceReader(
        files, SPEC, ReaderConfig(rank=rank, world_size=world_size, **cfg)
    )
    reader.set_epoch(epoch, skip)
    loader = DataLoader(reader, batch_size=None, num_workers=num_workers)
    return list(loader), len(reader)


def member_ids(batches):
    return [int(m) for b in batches for m in b.rows["member_id"]]


def every_rank(split_dir, world_size, num_workers, **cfg):
    """One epoch on every rank: (member ids over all ranks, the set of the ranks' batch counts)."""
    seen, counts = [], set()
    for rank in range(world_size):
        batches, length = epoch_batches(split_dir, world_size, rank, num_workers, **cfg)
        assert len(batches) == length
        assert all(1 <= len(b) <= cfg["batch_size"] for b in batches)
        counts.add(len(batches))
        seen += member_ids(batches)
    return seen, counts


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle,bucketing", [(False, False), (False, True), (True, False), (True, True)])
def test_ranks_and_workers_partition_rows(uneven_split, world_size, num_workers, shuffle, bucketing):
    seen, counts = every_rank(uneven_split, world_size, num_workers, batch_size=16, shuffle=shuffle,
                              shuffle_buffer=40, seed=3, length_bucketing=bucketing)
    assert len(counts) == 1, f"ranks got different batch counts: {counts}"
    assert sorted(seen) == list(range(203)), "rows missing or duplicated"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_and_epoch_same_order(uneven_split, num_workers):
    kw = dict(batch_size=16, shuffle=True, shuffle_buffer=40, session_shuffle=True)
    a, _ = epoch_batches(uneven_split, 2, 1, num_workers, epoch=1, seed=7, **kw)
    b, _ = epoch_batches(uneven_split, 2, 1, num_workers, epoch=1, seed=7, **kw)
    c, _ = epoch_batches(uneven_split, 2, 1, num_workers, epoch=2, seed=7, **kw)
    assert member_ids(a) == member_ids(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.values["item_ids"], y.values["item_ids"])
    assert member_ids(a) != member_ids(c), "a new epoch should reshuffle"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("skip", [1, 2, 5])
def test_resume_skips_exactly_the_consumed_batches(uneven_split, num_workers, skip):
    kw = dict(batch_size=8, shuffle=True, shuffle_buffer=40, seed=1, length_bucketing=True,
              session_shuffle=True, session_gap_s=1000)
    full, _ = epoch_batches(uneven_split, 1, 0, num_workers, epoch=3, **kw)
    rest, _ = epoch_batches(uneven_split, 1, 0, num_workers, epoch=3, skip=skip, **kw)
    assert [member_ids([b]) for b in rest] == [member_ids([b]) for b in full[skip:]]
    for a, b in zip(rest, full[skip:]):  # same impressions in the same (session-shuffled) order
        np.testing.assert_array_equal(a.values["item_ids"], b.values["item_ids"])


def test_length_bucketing_cuts_padding(uneven_split):
    def padding(batches):
        return sum(len(b) * b.lengths.max() - b.lengths.sum() for b in batches)

    kw = dict(batch_size=8, shuffle=True, shuffle_buffer=200, seed=2)
    plain, _ = epoch_batches(uneven_split, 1, 0, 0, **kw)
    bucketed, _ = epoch_batches(uneven_split, 1, 0, 0, length_bucketing=True, **kw)
    assert sorted(member_ids(plain)) == sorted(member_ids(bucketed))
    assert padding(bucketed) < 0.5 * padding(plain)
    lengths = [int(b.lengths.max()) for b in bucketed]
    assert lengths != sorted(lengths), "bucketed batches should come in random order"


def test_evaluation_bucketing_is_deterministic_and_cuts_padding(uneven_split):
    def padding(batches):
        return sum(len(b) * b.lengths.max() - b.lengths.sum() for b in batches)

    kw = dict(batch_size=8, shuffle=False, shuffle_buffer=64)
    plain, _ = epoch_batches(uneven_split, 1, 0, 0, **kw)
    bucketed, _ = epoch_batches(uneven_split, 1, 0, 0, length_bucketing=True, **kw)
    again, _ = epoch_batches(uneven_split, 1, 0, 0, length_bucketing=True, **kw)
    assert member_ids(bucketed) == member_ids(again)
    assert sorted(member_ids(plain)) == sorted(member_ids(bucketed)) == list(range(203))
    assert padding(bucketed) < 0.5 * padding(plain)


def test_drop_last_gives_full_equal_batches(uneven_split):
    kept = []
    for rank in range(2):
        batches, _ = epoch_batches(uneven_split, 2, rank, 0, batch_size=16, drop_last=True)
        assert [len(b) for b in batches] == [16] * 6
        kept += member_ids(batches)
    assert len(set(kept)) == len(kept) == 192


def test_batch_sizes_equal_count_and_bounds():
    for n in range(1, 60):
        for k in range(max(1, -(-n // 8)), min(n, -(-n // 8) + 2) + 1):
            sizes = batch_sizes(n, k, 8)
            assert len(sizes) == k and sum(sizes) == n and all(1 <= s <= 8 for s in sizes)


def test_truncation_keeps_newest_and_caps_targets(uneven_split):
    batches, _ = epoch_batches(uneven_split, 1, 0, 0, batch_size=300, max_seq_len=4)
    full, _ = epoch_batches(uneven_split, 1, 0, 0, batch_size=300)
    short, long_ = batches[0], full[0]
    assert short.lengths.max() <= 4
    np.testing.assert_array_equal(short.lengths, np.minimum(long_.lengths, 4))
    np.testing.assert_array_equal(
        short.rows["num_targets"], np.minimum(long_.rows["num_targets"], short.lengths)
    )
    last = long_.offsets[1:]
    np.testing.assert_array_equal(short.values["item_ids"][short.offsets[1:] - 1],
                                  long_.values["item_ids"][last - 1])


def test_session_shuffle_permutes_within_sessions_only(uneven_split):
    plain, _ = epoch_batches(uneven_split, 1, 0, 0, batch_size=300)
    mixed, _ = epoch_batches(uneven_split, 1, 0, 0, batch_size=300,
                             session_shuffle=True, session_gap_s=1000, seed=5)
    a, b = plain[0], mixed[0]
    assert not np.array_equal(a.values["item_ids"], b.values["item_ids"])
    for i in range(len(a)):
        lo, hi = a.offsets[i], a.offsets[i + 1]
        nt = a.rows["num_targets"][i]
        ts_a = a.values["timestamps"][lo:hi]
        # sessions: split at gaps > 1000 s and at the history/target boundary
        cuts = set(np.flatnonzero(np.diff(ts_a) > 1000) + 1) | {hi - lo - nt}
        bounds = sorted({0, hi - lo} | cuts)
        for s, e in zip(bounds[:-1], bounds[1:]):
            key = lambda blk: sorted(zip(blk.values["timestamps"][lo + s:lo + e],  # noqa: E731
                                         blk.values["item_ids"][lo + s:lo + e]))
            assert key(a) == key(b), "an impression left its session"


def test_reader_streams_row_groups_not_files(uneven_split, monkeypatch):
    """Reading calls read_row_group only, one row group at a time."""
    import pyarrow.parquet as pq

    calls = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **k):
        calls.append(i)
        return original(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    batches, _ = epoch_batches(uneven_split, 1, 0, 0, batch_size=32)
    assert sum(len(b) for b in batches) == 203
    num_row_groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in uneven_split.iterdir())
    assert len(calls) == num_row_groups == 8 + 4 + 1 + 2  # each row group read exactly once


@pytest.mark.parametrize("batch_size,buffer", [(64, 40), (128, 100), (16, 1)])
@pytest.mark.parametrize("world_size", [1, 2])
def test_bucketed_shuffle_with_a_buffer_smaller_than_a_batch(uneven_split, batch_size, buffer, world_size):
    seen, counts = every_rank(uneven_split, world_size, 0, batch_size=batch_size, shuffle=True,
                              shuffle_buffer=buffer, length_bucketing=True)
    assert len(counts) == 1, f"ranks got different batch counts: {counts}"
    assert sorted(seen) == list(range(203)), "rows missing or duplicated"


HOLDOUT = 23  # the first 23 rows of the split: crosses three 7-row row groups into a fourth


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_head_rows_are_never_trained_on(uneven_split, world_size, num_workers):
    kw = dict(batch_size=16, shuffle=True, shuffle_buffer=40, seed=3, length_bucketing=True,
              head_rows=HOLDOUT)
    train, counts = every_rank(uneven_split, world_size, num_workers, **kw)
    held, held_counts = every_rank(uneven_split, world_size, num_workers, only_head=True, **kw)
    assert len(counts) == len(held_counts) == 1, f"ranks got different batch counts: {counts}, {held_counts}"
    # conftest's member ids count rows in file / row-group order: the holdout is members 0..22
    assert sorted(held) == list(range(HOLDOUT))
    assert sorted(train) == list(range(HOLDOUT, 203)), "holdout rows trained on, or rows lost"


def test_holdout_is_deterministic_across_seeds_and_epochs(uneven_split):
    def holdout(seed, epoch):
        batches, _ = epoch_batches(uneven_split, 1, 0, 0, epoch=epoch, seed=seed, batch_size=64,
                                   head_rows=HOLDOUT, only_head=True)
        return member_ids(batches), np.concatenate([b.values["item_ids"] for b in batches])

    ids, items = holdout(0, 0)
    assert ids == list(range(HOLDOUT))
    for seed, epoch in [(0, 0), (5, 3)]:
        again_ids, again_items = holdout(seed, epoch)
        assert again_ids == ids
        np.testing.assert_array_equal(again_items, items)


def test_build_loader_threads_the_holdout(uneven_split):
    from feedsr.data.config import DataConfig, batch_spec, build_loader

    cfg = DataConfig(path=str(uneven_split.parent), action_names=ACTIONS, tasks=[{"name": "click"}],
                     id_tables={"item_ids": 50}, categorical={"surface": 4}, context=["age"],
                     batch_size=16, num_workers=0)
    spec = batch_spec(cfg)

    def members(**holdout):
        loader = build_loader(cfg, spec, "train", train=True, **holdout)
        return sorted(int(m) for batch in loader for m in batch.member_ids)

    assert members(head_rows=HOLDOUT, only_head=True) == list(range(HOLDOUT))
    assert members(head_rows=HOLDOUT) == list(range(HOLDOUT, 203))
    assert members() == list(range(203))


def test_bad_holdout_is_rejected(uneven_split):
    with pytest.raises(ValueError, match="head_rows must be >= 0, got -1"):
        ReaderConfig(batch_size=8, head_rows=-1)
    with pytest.raises(ValueError, match="only_head=True needs head_rows >= 1"):
        ReaderConfig(batch_size=8, only_head=True)
    with pytest.raises(DataError, match="head_rows=203 leaves no rows of the split's 203"):
        epoch_batches(uneven_split, 1, 0, 0, batch_size=8, head_rows=203)
    # reading the first N rows of a shorter split (a validation cap) reads all of it
    batches, _ = epoch_batches(uneven_split, 2, 1, 0, batch_size=8, head_rows=500, only_head=True)
    everything, _ = epoch_batches(uneven_split, 2, 1, 0, batch_size=8)
    assert member_ids(batches) == member_ids(everything)
