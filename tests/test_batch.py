"""Collation: KeyedJaggedTensor layout, labels from action bits, target mask, padding helper."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import torch
from torch.utils.data import DataLoader

from conftest import ACTIONS, MODEL_SPEC, SPEC, make_block
from feedsr.data.batch import BatchSpec, Collator, collate, pad_jagged
from feedsr.data.reader import ReaderConfig, SequenceReader, open_files, split_files
from feedsr.data.tasks import build_tasks, encode_actions

TASKS = tuple(build_tasks(
    [{"name": "click"}, {"name": "engage", "actions": ["like", "share"], "group": "active"}], ACTIONS
))
BSPEC = BatchSpec(SPEC, TASKS, {"item_ids": 50, "author_ids": 1000, "cat_surface": 4})


def blocks_and_batches(split_dir, num_workers=0):
    files = open_files(split_files(split_dir.parent, "train"), SPEC)
    cfg = ReaderConfig(batch_size=32)
    blocks = list(DataLoader(SequenceReader(files, SPEC, cfg), batch_size=None, num_workers=num_workers))
    loader = DataLoader(SequenceReader(files, SPEC, cfg, collate=Collator(BSPEC)),
                        batch_size=None, num_workers=num_workers)
    return blocks, list(loader)


def test_batch_matches_block(uneven_split):
    blocks, batches = blocks_and_batches(uneven_split, num_workers=2)  # crosses a process boundary
    for block, batch in zip(blocks, batches):
        n = int(block.lengths.sum())
        assert batch.sparse.keys() == ["item_ids", "author_ids", "cat_surface"]
        feats = batch.sparse.to_dict()
        np.testing.assert_array_equal(feats["item_ids"].lengths().numpy(), block.lengths)
        np.testing.assert_array_equal(feats["item_ids"].values().numpy(), block.values["item_ids"] % 50)
        np.testing.assert_array_equal(feats["author_ids"].values().numpy(), block.values["author_ids"])
        bits = block.values["action_bits"]
        np.testing.assert_array_equal(batch.labels[:, 0].numpy(), (bits & 1) != 0)
        np.testing.assert_array_equal(batch.labels[:, 1].numpy(), (bits & 0b110) != 0)
        assert batch.actions.shape == (n, 3) and set(batch.actions.unique().tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(encode_actions(batch.actions.numpy()), bits)
        assert batch.context.shape == (n, 1) and batch.true_probs.isnan().all()
        # target_mask marks exactly the num_targets tail of each row
        for i, (lo, hi) in enumerate(zip(block.offsets[:-1], block.offsets[1:])):
            mask = batch.target_mask[lo:hi].numpy()
            nt = block.rows["num_targets"][i]
            assert mask.sum() == nt and mask[hi - lo - nt:].all()


def test_batch_pickles_and_moves(uneven_split):
    _, batches = blocks_and_batches(uneven_split)
    b = pickle.loads(pickle.dumps(batches[0]))
    assert torch.equal(b.sparse.values(), batches[0].sparse.values())
    assert b.to("cpu").labels.shape == batches[0].labels.shape


def test_pad_jagged_round_trip():
    lengths = torch.tensor([3, 1, 0, 2])
    values = torch.arange(6.0)[:, None].repeat(1, 2)  # (6, 2)
    padded, mask = pad_jagged(values, lengths, 3, padding_value=-1)
    assert padded.shape == (4, 3, 2)
    assert torch.equal(padded[mask], values)
    assert (padded[~mask] == -1).all()
    assert mask.sum(1).tolist() == [3, 1, 0, 2]


def test_session_ids_come_from_the_unshuffled_order(uneven_split):
    """The in-session shuffle moves timestamps out of order; the session ids travel unchanged."""
    from feedsr.data.block import session_ids

    files = open_files(split_files(uneven_split.parent, "train"), SPEC)
    spec = dataclasses.replace(BSPEC, session_gap_s=1000)

    def first_batch(shuffle):
        cfg = ReaderConfig(batch_size=300, session_shuffle=shuffle, session_gap_s=1000, seed=5)
        return next(iter(SequenceReader(files, SPEC, cfg, collate=Collator(spec))))

    plain, mixed = first_batch(False), first_batch(True)
    np.testing.assert_array_equal(
        plain.session_ids.numpy(), session_ids(plain.timestamps.numpy(), plain.lengths.numpy(), 1000))
    for lo, hi in zip(plain.offsets[:-1].tolist(), plain.offsets[1:].tolist()):
        key = lambda b: sorted(zip(b.session_ids[lo:hi].tolist(), b.timestamps[lo:hi].tolist(),  # noqa: E731
                                   b.sparse["item_ids"].values()[lo:hi].tolist()))
        assert key(mixed) == key(plain), "an impression changed its session id"
    # guard: the gap rule on the shuffled timestamps would have split sessions
    regapped = session_ids(mixed.timestamps.numpy(), mixed.lengths.numpy(), 1000)
    assert (regapped != mixed.session_ids.numpy()).any()


def test_batch_index_in_row_is_the_blocks():
    block = make_block([5, 1, 3], seed=2)
    got = collate(block, MODEL_SPEC).index_in_row()
    assert got.tolist() == block.index_in_row().tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2]
