"""Batch: what the models consume, built from a SequenceBlock.

Sequences stay jagged: per-impression tensors are flat over the batch's impressions (N = sum of
lengths), with ``lengths`` telling which belong to which member. Id features go into one TorchRec
``KeyedJaggedTensor`` (one key per feature, the same lengths for every key), ready for an
``EmbeddingCollection`` or a sharded one. Padding happens only inside the model (``pad_jagged``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feedsr.data.block import DEFAULT_SESSION_GAP_S, SequenceBlock, sessions_of
from feedsr.data.reader import ReadSpec
from feedsr.data.schema import CATEGORICAL_PREFIX, CONTEXT_PREFIX, DENSE_PREFIX, ID_COLUMNS, TRUE_PROB_PREFIX
from feedsr.data.tasks import Task, decode_actions, task_bitmasks, task_labels


@dataclass
class Batch:
    sparse: KeyedJaggedTensor  # keys = id features; lengths (B,) per key
    lengths: torch.Tensor  # (B,) int64 impressions per member
    member_ids: torch.Tensor  # (B,) int64
    num_targets: torch.Tensor  # (B,) int64 trailing target impressions per member
    timestamps: torch.Tensor  # (N,) int64 seconds
    session_ids: torch.Tensor  # (N,) int64 session index within the member's row (from 0), taken
    # before the in-session shuffle: the shuffled timestamps no longer show where sessions end
    positions: torch.Tensor  # (N,) int64 feed position, -1 unknown
    actions: torch.Tensor  # (N, M) float32 multi-hot of the M actions (the action-token input)
    context: torch.Tensor  # (N, C) float32 late-fusion features
    dense: torch.Tensor  # (N, E) float32 numbers of the post token (dense_ columns)
    labels: torch.Tensor  # (N, K) float32 one column per task
    target_mask: torch.Tensor  # (N,) bool: impression is a target (in its row's num_targets tail)
    true_probs: torch.Tensor  # (N, K) float32 true probability per task, NaN where unknown

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> torch.Tensor:  # (B+1,)
        return torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])

    def index_in_row(self) -> torch.Tensor:
        """(N,) int64: each impression's index in its row (``SequenceBlock.index_in_row``)."""
        starts = torch.repeat_interleave(self.offsets[:-1], self.lengths)
        return torch.arange(len(starts), device=self.lengths.device) - starts

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{
            f.name: getattr(self, f.name).to(device=device, non_blocking=non_blocking)
            for f in fields(self)
        })

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)


@dataclass(frozen=True)
class BatchSpec:
    """How a SequenceBlock becomes a Batch.

    Args:
        read: the columns read (action names, categoricals, dense and context features, true
            probabilities).
        tasks: the prediction tasks.
        id_table_sizes: id feature -> table size; ids are taken modulo the size (an id space
            smaller than the table is therefore collision-free). Keys: ``item_ids`` and/or
            ``author_ids`` (a missing one is not fed to the model), then ``cat_<name>`` for each
            categorical.
        session_gap_s: seconds without an impression that end a session, for rows that do not
            carry their session ids yet (``data.session_gap_s``; serving uses it too).
    """

    read: ReadSpec
    tasks: tuple[Task, ...]
    id_table_sizes: dict[str, int]
    session_gap_s: int = DEFAULT_SESSION_GAP_S

    def __post_init__(self):
        cats = [CATEGORICAL_PREFIX + c for c in self.read.categorical]
        ids = [k for k in self.id_table_sizes if k not in cats]
        if ids != [c for c in ID_COLUMNS if c in ids] or \
                [k for k in self.id_table_sizes if k in cats] != cats or not self.id_table_sizes:
            raise ValueError(f"id_table_sizes keys {list(self.id_table_sizes)}: expected some of "
                             f"{list(ID_COLUMNS)} in that order, then every categorical {cats}")
        bad = {k: v for k, v in self.id_table_sizes.items() if v < 1}
        if bad:
            raise ValueError(f"id table sizes must be >= 1, got {bad}")

    @property
    def id_features(self) -> list[str]:
        return list(self.id_table_sizes)

    def true_probs(self, values: dict[str, np.ndarray], n: int) -> np.ndarray:
        """(n, K) float32 true probability per task from the ``true_`` columns, NaN where unknown."""
        true = np.full((n, len(self.tasks)), np.nan, np.float32)
        for k, col in enumerate(self.true_prob_columns()):
            if col is not None:
                true[:, k] = values[col]
        return true

    def true_prob_columns(self) -> list[str | None]:
        """Per task, the true_ column that gives its probability (single-action tasks only)."""
        have = set(self.read.true_probs)
        return [
            TRUE_PROB_PREFIX + t.actions[0] if len(t.actions) == 1 and t.actions[0] in have else None
            for t in self.tasks
        ]


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy when possible; Arrow hands out read-only buffers, which torch must not alias."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def collate(block: SequenceBlock, spec: BatchSpec) -> Batch:
    """SequenceBlock -> Batch (CPU tensors)."""
    v, lengths = block.values, block.lengths
    n = int(lengths.sum())
    ids = [v[name] % size for name, size in spec.id_table_sizes.items()]
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=spec.id_features,
        values=torch.from_numpy(np.concatenate(ids)),
        lengths=torch.from_numpy(np.tile(lengths, len(ids))),
    )
    bits = v["action_bits"]
    actions = decode_actions(bits, len(spec.read.action_names)).astype(np.float32)
    return Batch(
        sparse=sparse,
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        member_ids=_tensor(block.rows["member_id"]),
        num_targets=_tensor(block.rows["num_targets"]),
        timestamps=_tensor(v["timestamps"]),
        session_ids=_tensor(sessions_of(block, spec.session_gap_s)),
        positions=_tensor(v["positions"]),
        actions=torch.from_numpy(actions),
        context=torch.from_numpy(stack_columns(v, [CONTEXT_PREFIX + c for c in spec.read.context], n)),
        dense=torch.from_numpy(stack_columns(v, [DENSE_PREFIX + c for c in spec.read.dense], n)),
        labels=torch.from_numpy(task_labels(bits, task_bitmasks(list(spec.tasks), list(spec.read.action_names)))),
        target_mask=torch.from_numpy(block.target_flags()),
        true_probs=torch.from_numpy(spec.true_probs(v, n)),
    )


def stack_columns(values: dict[str, np.ndarray], columns: list[str], n: int) -> np.ndarray:
    """(n, len(columns)) float32: per-impression float columns side by side."""
    if not columns:
        return np.zeros((n, 0), np.float32)
    return np.ascontiguousarray(np.stack([values[c] for c in columns], axis=1), dtype=np.float32)


class Collator:
    """A picklable ``collate`` bound to a spec (DataLoader workers pickle the dataset)."""

    def __init__(self, spec: BatchSpec):
        self.spec = spec

    def __call__(self, block: SequenceBlock) -> Batch:
        return collate(block, self.spec)


def pad_jagged(
    values: torch.Tensor, lengths: torch.Tensor, max_len: int, padding_value: float | int = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) flat values -> ((B, T, ...) padded, (B, T) bool mask of real positions)."""
    batch = len(lengths)
    mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
    out = values.new_full((batch, max_len, *values.shape[1:]), padding_value)
    out[mask] = values
    return out, mask
