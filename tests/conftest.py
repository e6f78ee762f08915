"""Shared test helpers: small real Parquet files in the feedsr schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from feedsr.data.reader import ReadSpec
from feedsr.data.schema import write_sequences

ACTIONS = ["click", "like", "share"]
SPEC = ReadSpec(action_names=tuple(ACTIONS), categorical=("surface",), context=("age",))


def random_rows(num_rows: int, seed: int, first_member: int = 0, max_len: int = 12) -> pa.Table:
    """Sequence rows with random lengths and values; member_id is unique and increasing."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, num_rows)
    n = int(lengths.sum())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    lst = lambda values: pa.ListArray.from_arrays(offsets, pa.array(values))  # noqa: E731
    ts = np.concatenate([np.sort(rng.integers(0, 10_000, k)) for k in lengths])
    return pa.table({
        "member_id": pa.array(np.arange(first_member, first_member + num_rows)),
        "item_ids": lst(rng.integers(0, 1000, n)),
        "author_ids": lst(rng.integers(0, 100, n)),
        "timestamps": lst(ts),
        "positions": lst(rng.integers(-1, 20, n)),
        "action_bits": lst(rng.integers(0, 1 << len(ACTIONS), n)),
        "num_targets": pa.array([int(rng.integers(1, k + 1)) for k in lengths]),
        "cat_surface": lst(rng.integers(0, 3, n)),
        "ctx_age": lst(rng.random(n).astype(np.float32)),
    })


def write_files(directory: Path, rows_per_file: list[int], row_group_sizes: list[int]) -> Path:
    """Files of the given row counts and row-group sizes (uneven on purpose); returns the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    member = 0
    for i, (rows, rg) in enumerate(zip(rows_per_file, row_group_sizes)):
        table = random_rows(rows, seed=i, first_member=member)
        write_sequences(table, directory / f"part-{i:05d}.parquet", ACTIONS, row_group_size=rg)
        member += rows
    return directory


@pytest.fixture
def uneven_split(tmp_path) -> Path:
    """A split of 4 files, 203 rows, row groups of 7..50 rows."""
    return write_files(tmp_path / "train", [50, 61, 3, 89], [7, 20, 3, 50])


# ------------------------------------------------------------------ model-level helpers

from feedsr.data.batch import Batch, BatchSpec, collate  # noqa: E402
from feedsr.data.block import SequenceBlock  # noqa: E402
from feedsr.data.tasks import build_tasks  # noqa: E402

MODEL_TASKS = tuple(build_tasks(
    [{"name": "click", "group": "passive"}, {"name": "like", "group": "active"},
     {"name": "share", "group": "active"}], ACTIONS,
))
MODEL_SPEC = BatchSpec(SPEC, MODEL_TASKS, {"item_ids": 64, "author_ids": 16, "cat_surface": 4})


def make_block(lengths, seed=0, gap_every=None) -> SequenceBlock:
    """Random rows of the given lengths; every impression is a target.

    Labels follow a learnable rule (click iff the item id is even, like iff the previous item
    was clicked and the author is even), so a model trained on them must see ids and history.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    items = rng.integers(0, 64, n)
    authors = rng.integers(0, 16, n)
    click = (items % 2 == 0).astype(np.int64)
    prev_click = np.concatenate([[0], click[:-1]])
    prev_click[np.cumsum(lengths) - lengths] = 0
    like = prev_click & (authors % 2 == 0)
    share = (rng.random(n) < 0.1).astype(np.int64)
    step = 100 if gap_every is None else 100
    ts = np.concatenate([np.arange(k) * step for k in lengths])
    if gap_every is not None:  # a new session every `gap_every` impressions
        ts = ts + np.concatenate([(np.arange(k) // gap_every) * 10_000 for k in lengths])
    return SequenceBlock(
        lengths=lengths,
        rows={"member_id": np.arange(len(lengths)), "num_targets": lengths.copy()},
        values={
            "item_ids": items, "author_ids": authors, "timestamps": ts,
            "positions": rng.integers(-1, 70, n), "action_bits": click | (like << 1) | (share << 2),
            "cat_surface": rng.integers(0, 3, n), "ctx_age": rng.random(n).astype(np.float32),
        },
    )


def make_batch(lengths, seed=0, gap_every=None) -> Batch:
    return collate(make_block(lengths, seed, gap_every), MODEL_SPEC)


# ------------------------------------------------------------------ training helpers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset shared by the training tests (generated once per session)."""
    from feedsr.prepare.synthetic import generate

    path = tmp_path_factory.mktemp("synthetic")
    generate(path, num_members=1500, seed=0, max_seq_len=64)
    return path


def tiny_overrides(data_dir: Path, run_root: Path, run_id: str) -> list[str]:
    """A model and run small enough for a 2-core CI machine."""
    return [
        f"data.path={data_dir}", "data.generate=null", "data.max_seq_len=64", "data.batch_size=32",
        "data.eval_batch_size=128", "data.num_workers=0", "data.shuffle_buffer=512",
        "model.embedding_dim=8", "model.num_layers=1", "model.ffn_dim=64", "model.dropout=0.0",
        "model.head.expert_dims=[32]", "model.head.tower_dims=[16]", "model.position_bias.score_position=null",
        f"output_root={run_root}", f"run_id={run_id}",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.num_threads=1",
        "trainer.log_every=1",
    ]


def compose(overrides: list[str]):
    from feedsr.runtime.config import compose_config

    return compose_config(overrides)


# ------------------------------------------------------------------ real multi-process runs

from feedsr.runtime.distributed import free_port  # noqa: E402,F401  (tests import it from here)

def run_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real processes joined by gloo."""
    import os

    import torch.multiprocessing as mp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(_rank_main, args=(world_size, fn, args), nprocs=world_size, join=True)


def _rank_main(rank, world_size, fn, args):
    import os

    import torch
    import torch.distributed as dist

    from feedsr.quiet import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)  # an exception propagates to mp.spawn with its traceback
    # Tear down in a fixed order and leave without running C++ destructors at interpreter exit:
    # DDP/gloo threads still alive then abort the process ("terminate called without an active
    # exception") after the test body has already passed.
    import gc
    import sys

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
