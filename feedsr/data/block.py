"""SequenceBlock: a run of sequence rows held as flat numpy arrays (jagged, no padding).

Per-row arrays have one entry per row; per-impression arrays are flat over all impressions of the
block, row i owning ``values[offsets[i]:offsets[i+1]]``. Every reshuffle, slice and truncation is a
single numpy gather, so the reader never loops over rows in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SESSION_IDS = "session_ids"  # a derived per-impression value: computed once, before any shuffle
DEFAULT_SESSION_GAP_S = 1800  # 30 minutes without an impression end a session


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_starts, lengths) + np.arange(total, dtype=np.int64)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


@dataclass
class SequenceBlock:
    lengths: np.ndarray  # (n,) int64
    rows: dict[str, np.ndarray]  # name -> (n,) per-row values (member_id, num_targets)
    values: dict[str, np.ndarray]  # name -> (sum(lengths), ...) per-impression values

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> np.ndarray:
        return offsets_of(self.lengths)

    def gather(self, row_idx: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> SequenceBlock:
        """Rows ``row_idx``, each keeping impressions [starts, starts + lengths) (flat indices)."""
        elem = ranges(starts, lengths)
        return SequenceBlock(
            lengths=lengths.astype(np.int64),
            rows={k: v[row_idx] for k, v in self.rows.items()},
            values={k: v[elem] for k, v in self.values.items()},
        )

    def take(self, row_idx: np.ndarray) -> SequenceBlock:
        """Rows in the order of ``row_idx`` (whole rows)."""
        row_idx = np.asarray(row_idx, dtype=np.int64)
        return self.gather(row_idx, self.offsets[:-1][row_idx], self.lengths[row_idx])

    def slice(self, lo: int, hi: int) -> SequenceBlock:
        """Rows [lo, hi), without copying."""
        off = self.offsets
        a, b = off[lo], off[hi]
        return SequenceBlock(
            lengths=self.lengths[lo:hi],
            rows={k: v[lo:hi] for k, v in self.rows.items()},
            values={k: v[a:b] for k, v in self.values.items()},
        )

    def index_in_row(self) -> np.ndarray:
        """(N,) int: each impression's index in its row (the impressions before it there)."""
        return np.arange(int(self.lengths.sum())) - np.repeat(self.offsets[:-1], self.lengths)

    def target_flags(self) -> np.ndarray:
        """(N,) bool: impression is in its row's num_targets tail."""
        return self.index_in_row() >= np.repeat(self.lengths - self.rows["num_targets"], self.lengths)

    def time_goes_back(self) -> np.ndarray:
        """(N,) bool: impression is older than the one before it in its row (rows are oldest first)."""
        back = np.zeros(int(self.lengths.sum()), dtype=bool)
        back[1:] = np.diff(self.values["timestamps"]) < 0
        back[self.offsets[:-1][self.lengths > 0]] = False  # a row may start before the last one ends
        return back

    def truncate(self, max_len: int) -> SequenceBlock:
        """Keep each row's newest ``max_len`` impressions; num_targets shrinks with it."""
        if len(self) == 0 or self.lengths.max() <= max_len:
            return self
        keep = np.minimum(self.lengths, max_len)
        out = self.gather(np.arange(len(self)), self.offsets[1:] - keep, keep)
        out.rows["num_targets"] = np.minimum(out.rows["num_targets"], keep)
        return out

    @staticmethod
    def concat(blocks: list[SequenceBlock]) -> SequenceBlock:
        if len(blocks) == 1:
            return blocks[0]
        return SequenceBlock(
            lengths=np.concatenate([b.lengths for b in blocks]),
            rows={k: np.concatenate([b.rows[k] for b in blocks]) for k in blocks[0].rows},
            values={k: np.concatenate([b.values[k] for b in blocks]) for k in blocks[0].values},
        )


def session_ids(timestamps: np.ndarray, lengths: np.ndarray, gap_s: int) -> np.ndarray:
    """(N,) int64 session index of each impression within its row, counted from 0.

    The one definition of a session: a new one starts after more than ``gap_s`` seconds without an
    impression. ``timestamps`` must be oldest first within each row (as stored, before a shuffle).
    """
    new = np.zeros(len(timestamps), dtype=np.int64)
    new[1:] = np.diff(timestamps) > gap_s
    starts = offsets_of(lengths)[:-1][lengths > 0]
    new[starts] = 0
    count = np.cumsum(new)
    return count - np.repeat(count[starts], lengths[lengths > 0])


def sessions_of(block: SequenceBlock, gap_s: int) -> np.ndarray:
    """The block's session ids: those it carries (computed before a shuffle), else from its times."""
    if SESSION_IDS in block.values:
        return block.values[SESSION_IDS]
    return session_ids(block.values["timestamps"], block.lengths, gap_s)


def session_shuffle(
    block: SequenceBlock, gap_s: int, rng: np.random.Generator
) -> SequenceBlock:
    """Shuffle impression order within each session (split at gaps > ``gap_s`` seconds).

    A member's feedback inside one session is strongly correlated, and at serving time the current
    session is not in the history yet; shuffling within sessions stops the model from learning the
    within-session order (the paper's default). History and targets are shuffled separately, so no
    target moves into the history or the other way round. Timestamps travel with their impression,
    and so do the session ids, computed here first: the shuffled timestamps no longer show them.
    """
    n = int(block.lengths.sum())
    if n == 0:
        return block
    sessions = sessions_of(block, gap_s)
    off = block.offsets
    row_start = np.zeros(n, dtype=bool)
    row_start[off[:-1][block.lengths > 0]] = True
    target_start = np.zeros(n, dtype=bool)
    first_target = off[1:] - block.rows["num_targets"]
    target_start[first_target[first_target < off[1:]]] = True
    new_session = np.zeros(n, dtype=bool)
    new_session[1:] = np.diff(sessions) != 0
    segment = np.cumsum(row_start | target_start | new_session)  # non-decreasing segment id
    order = np.lexsort((rng.random(n), segment))  # random order within each segment
    values = block.values | {SESSION_IDS: sessions}
    return SequenceBlock(
        lengths=block.lengths,
        rows=block.rows,
        values={k: v[order] for k, v in values.items()},
    )
