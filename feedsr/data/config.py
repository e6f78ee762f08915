"""The data config (``conf/data/*.yaml``) and the wiring from it to loaders."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from feedsr.data.batch import BatchSpec, Collator
from feedsr.data.block import DEFAULT_SESSION_GAP_S
from feedsr.data.reader import ReaderConfig, ReadSpec, SequenceReader, open_files, split_files
from feedsr.data.schema import CATEGORICAL_PREFIX, ID_COLUMNS, MAX_ACTIONS, DataError
from feedsr.data.sequences import read_dataset_meta
from feedsr.data.output import check_writable
from feedsr.data.vocab import VOCAB_SIZES, collision_rate, table_sizes
from feedsr.data.tasks import Task, build_tasks

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal this process gets when its parent dies


@dataclass
class TaskConfig:
    name: str = "???"
    actions: list[str] = field(default_factory=list)  # empty: the action named like the task
    group: str = "default"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where the data is, what it holds, and how it is batched.

    ``id_tables`` and ``categorical`` give the embedding table size per id feature; ids are taken
    modulo it. ``null`` means the dataset's vocabulary size (``vocab_sizes`` in dataset.json: one
    row per id, none shared); a smaller table shares rows, and the trainer prints how many ids do.
    A feature left out of them is not fed to the model (e.g. post ids, when posts are so
    short-lived that their embeddings would only memorize the training window). ``generate``
    (synthetic data only) makes the dataset on first use when ``path`` holds none.
    """

    name: str = "synthetic"
    path: str = "data/synthetic"
    generate: dict | None = None  # kwargs of feedsr.data.synthetic.generate, or null
    action_names: list[str] = field(default_factory=list)
    tasks: list[TaskConfig] = field(default_factory=list)
    # Empty by default: OmegaConf merges dicts key by key, so a default entry could never be
    # removed by a data config. Remove one on the command line with ~data.id_tables.item_ids.
    id_tables: dict[str, int | None] = field(default_factory=dict)
    categorical: dict[str, int | None] = field(default_factory=dict)  # name (no cat_ prefix) -> table size
    context: list[str] = field(default_factory=list)  # names (no ctx_ prefix)
    dense: list[str] = field(default_factory=list)  # names (no dense_ prefix): numbers in the post token
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    max_seq_len: int = 256
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 4096
    length_bucketing: bool = True  # training batches of similar lengths: far less padding
    session_shuffle: bool = True
    session_gap_s: int = DEFAULT_SESSION_GAP_S  # the one session rule: shuffle, mask and serving
    drop_last: bool = False

    def __post_init__(self):
        self._check_names()
        self._check_tables()
        for name in ("max_seq_len", "batch_size", "eval_batch_size", "session_gap_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        tasks_of(self)  # validates the task list against the action names

    def _check_names(self) -> None:
        if not self.action_names:
            raise ValueError("data.action_names is empty")
        if len(self.action_names) > MAX_ACTIONS:
            raise ValueError(f"data.action_names: at most {MAX_ACTIONS} actions fit in action_bits, "
                             f"got {len(self.action_names)}")
        for name in ("action_names", "context", "dense"):
            names = list(getattr(self, name))
            if len(set(names)) < len(names):
                raise ValueError(f"data.{name} has duplicates: {names}")

    def _check_tables(self) -> None:
        unknown = set(self.id_tables) - set(ID_COLUMNS)
        if unknown or not (self.id_tables or self.categorical):
            raise ValueError(
                f"data.id_tables takes some of {list(ID_COLUMNS)} (got {list(self.id_tables)}), and the "
                "model needs at least one id or categorical feature"
            )
        for name in ("id_tables", "categorical"):
            for key, size in getattr(self, name).items():
                if size is not None and size < 1:
                    raise ValueError(f"data.{name}.{key} must be >= 1 or null (the dataset's "
                                     f"vocabulary size), got {size}")


def tasks_of(cfg: DataConfig) -> list[Task]:
    return build_tasks([t if isinstance(t, dict) else vars(t) for t in cfg.tasks], cfg.action_names)


def ensure_dataset(cfg: DataConfig, generate=None) -> dict:
    """The dataset's metadata; generates synthetic data first if configured (``data.generate``)
    and missing, with ``generate`` (``feedsr.prepare.synthetic.generate``: simulate a log, then
    the log pipeline, a layer above this one, which the trainer passes in).

    A file lock makes concurrent ranks wait for the one that generates.
    """
    path = Path(cfg.path)
    meta = read_dataset_meta(path)
    if meta is None and cfg.generate is not None and generate is not None:
        check_writable(path)  # before the lock file lands beside it
        path.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            meta = read_dataset_meta(path)
            if meta is None:
                print(f"[data] generating synthetic data into {path} ({dict(cfg.generate)})", flush=True)
                meta = generate(path, max_seq_len=cfg.max_seq_len, **dict(cfg.generate))
    if meta is None:
        raise DataError(
            f"{path}: no dataset.json: not a feedsr dataset (make one with scripts/make_synthetic.py, "
            "python -m feedsr.prepare or scripts/prepare_kuairand.py, or write the schema in the README yourself)"
        )
    if meta.get("action_names") and list(meta["action_names"]) != list(cfg.action_names):
        raise DataError(
            f"{path}/dataset.json: action names {meta['action_names']} differ from "
            f"data.action_names {list(cfg.action_names)}"
        )
    missing = [c for c in cfg.dense if c not in meta.get("dense", [])]
    if cfg.generate is not None and missing:  # generated by an older version: without them
        raise DataError(
            f"{path}/dataset.json: the data has no dense feature(s) {missing} that data.dense lists; "
            f"it was generated before they existed: delete {path} and it is generated again"
        )
    return meta


def check_dataset(cfg: DataConfig) -> None:
    """What ``ensure_dataset`` would refuse, checked without writing anything (every rank runs it
    before rank 0 generates, so a refusal stops every rank instead of leaving them waiting)."""
    if read_dataset_meta(cfg.path) is None and cfg.generate is not None:
        check_writable(cfg.path)


def batch_spec(cfg: DataConfig, meta: dict | None = None) -> BatchSpec:
    """The BatchSpec for this config; true probabilities are used when the dataset has them."""
    true_probs = tuple(meta.get("true_probs", [])) if meta else ()
    read = ReadSpec(
        action_names=tuple(cfg.action_names),
        categorical=tuple(cfg.categorical),
        context=tuple(cfg.context),
        true_probs=true_probs,
        dense=tuple(cfg.dense),
    )
    try:
        sizes = table_sizes(configured_tables(cfg), meta or {})
    except ValueError as e:
        raise DataError(f"{cfg.path}: {e}") from None
    return BatchSpec(read=read, tasks=tuple(tasks_of(cfg)), id_table_sizes=sizes,
                     session_gap_s=cfg.session_gap_s)


def configured_tables(cfg: DataConfig) -> dict[str, int | None]:
    """Id feature (column name) -> configured table size, None for the dataset's vocabulary."""
    ids = {k: cfg.id_tables[k] for k in ID_COLUMNS if k in cfg.id_tables}
    return ids | {CATEGORICAL_PREFIX + k: v for k, v in cfg.categorical.items()}


def collision_report(cfg: DataConfig, meta: dict) -> list[str]:
    """One line per table configured smaller than the dataset's vocabulary: ids then share rows."""
    recorded = meta.get(VOCAB_SIZES, {})
    lines = []
    for feature, size in configured_tables(cfg).items():
        vocab = recorded.get(feature)
        if size is not None and vocab is not None and size < vocab:
            lines.append(f"{feature}: {size} table rows for {vocab} ids: {collision_rate(vocab, size):.1%} "
                         f"of them share a row (set data.{_config_key(feature)}=null for one row each)")
    return lines


def _config_key(feature: str) -> str:
    if feature.startswith(CATEGORICAL_PREFIX):
        return f"categorical.{feature[len(CATEGORICAL_PREFIX):]}"
    return f"id_tables.{feature}"


def build_loader(
    cfg: DataConfig,
    spec: BatchSpec,
    split: str,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    head_rows: int = 0,
    only_head: bool = False,
) -> DataLoader:
    """A DataLoader over one split for one rank. Training shuffles; evaluation keeps file order.

    ``head_rows``: the split's first rows (file / row-group order) are left out; with
    ``only_head=True`` the loader reads only them (a validation cap in global rows).
    """
    files = open_files(split_files(cfg.path, split), spec.read)
    reader_cfg = ReaderConfig(
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        seed=seed,
        shuffle=train,
        shuffle_buffer=cfg.shuffle_buffer,
        length_bucketing=cfg.length_bucketing,
        max_seq_len=cfg.max_seq_len,
        session_shuffle=train and cfg.session_shuffle,
        session_gap_s=cfg.session_gap_s,
        drop_last=train and cfg.drop_last,
        rank=rank,
        world_size=world_size,
        head_rows=head_rows,
        only_head=only_head,
    )
    reader = SequenceReader(files, spec.read, reader_cfg, collate=Collator(spec))
    # Its own generator: each new iterator draws a worker base seed, which must not advance the
    # global RNG (dropout), or a resumed run would diverge from the uninterrupted one.
    return DataLoader(
        reader, batch_size=None, num_workers=cfg.num_workers,
        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=exit_with_parent,
    )


def exit_with_parent(worker_id: int) -> None:
    """Loader workers die with the process that reads from them (Linux): a SIGKILLed trainer cannot
    stop them, and PyTorch's own check notices a dead parent only every few seconds, so they
    lingered up to 15 s and could print a stray EOFError into the restarted run's output."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(0)
