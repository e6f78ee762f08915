"""Candidates: the posts a ranker scores for each member of a request, and how they become rows.

A candidate carries what a history impression carries before it is shown: its id features, its
dense features (the post token's numbers), its context features and (optionally) the feed slot it
would take. It has no actions yet, and its time is the request time. Candidates are kept like a ``SequenceBlock``, flat and member-major, so
the same ``collate`` that builds training batches builds their ``KeyedJaggedTensor`` (ids hashed
into the same tables), and one-by-one scoring is a history row with one candidate appended.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feedsr.data.batch import BatchSpec
from feedsr.data.block import SequenceBlock, offsets_of
from feedsr.data.schema import CONTEXT_PREFIX, DENSE_PREFIX, TRUE_PROB_PREFIX, UNKNOWN_POSITION


@dataclass
class Candidates:
    """N candidate posts for B members, flat and member-major.

    Args:
        counts: (B,) int, candidates per member; member b owns rows ``offsets[b]:offsets[b+1]``
            (0 is allowed for some members: they get no scores; the request needs >= 1 in all).
        request_times: (B,) int seconds, when each member's request is served. It is the
            candidates' impression time: it sets their time-aware RoPE angle (``model.rope``) and,
            with ``session_mask``, whether the newest history session is still the current one.
        values: column -> (N,) array, named like ``SequenceBlock`` columns: every id feature of the
            ``BatchSpec`` (``item_ids``, ``author_ids``, ``cat_<name>``: raw ids, hashed like the
            history's), ``dense_<name>`` for every dense feature (the post token's numbers,
            standardised by the model as the history's are), ``ctx_<name>`` for every context
            feature, and optionally ``positions`` (the feed slot; read only by a model that scores
            at the given position, ``position_bias.score_position: null``; default -1, unknown).

    Example::

        # member 0 gets 2 candidates, member 1 gets 1
        # (spec: item_ids, author_ids, cat_surface; dense_emb_0; ctx_age)
        Candidates(
            counts=[2, 1], request_times=[1_700_000_000, 1_700_000_050],
            values={"item_ids": [11, 12, 40], "author_ids": [3, 3, 9], "cat_surface": [0, 1, 0],
                    "dense_emb_0": [0.3, -1.2, 0.0], "ctx_age": [0.5, 0.1, 0.9]},
        )
    """

    counts: np.ndarray
    request_times: np.ndarray
    values: dict[str, np.ndarray]

    def __post_init__(self):
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.request_times = np.asarray(self.request_times, dtype=np.int64)
        self.values = {k: np.asarray(v) for k, v in self.values.items()}
        if self.counts.ndim != 1 or (self.counts < 0).any() or self.counts.sum() < 1:
            raise ValueError(f"candidate counts must be a 1-d array of counts >= 0 with a positive sum, "
                             f"got {self.counts}")
        if self.request_times.shape != self.counts.shape:
            raise ValueError(f"need one request time per member: got {self.request_times.shape[0]} "
                             f"times for {len(self.counts)} members")
        bad = {k: len(v) for k, v in self.values.items() if len(v) != self.num_candidates}
        if bad:
            raise ValueError(f"candidate columns must have sum(counts) = {self.num_candidates} rows, "
                             f"got {bad}")

    @property
    def num_candidates(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:  # (B+1,)
        return offsets_of(self.counts)

    def to_block(self, spec: BatchSpec) -> SequenceBlock:
        """The candidates as a block of B rows (one per member) that ``collate`` accepts.

        Actions are zero: a candidate's action token is never in its own sequence (X_t does not
        see A_t), so their value cannot reach a score. ``collate`` stacks the ``dense_`` and
        ``ctx_`` columns into the batch's ``dense`` (N, E) and ``context`` (N, C).
        """
        needed = candidate_features(spec)
        missing = [c for c in needed if c not in self.values]
        if missing:
            raise ValueError(f"candidates lack column(s) {missing}; the batch spec needs {needed}")
        n = self.num_candidates
        values = {c: self.values[c] for c in needed}
        values |= {TRUE_PROB_PREFIX + a: np.full(n, np.nan, np.float32) for a in spec.read.true_probs}
        values["action_bits"] = np.zeros(n, np.int64)
        values["timestamps"] = np.repeat(self.request_times, self.counts)
        values["positions"] = self.values.get("positions", np.full(n, UNKNOWN_POSITION, np.int64))
        rows = {"member_id": np.arange(len(self.counts)), "num_targets": self.counts}
        return SequenceBlock(lengths=self.counts, rows=rows, values=values)


def candidate_features(spec: BatchSpec) -> list[str]:
    """The columns every candidate needs: the id features, ``dense_<name>`` and ``ctx_<name>``."""
    return (spec.id_features + [DENSE_PREFIX + c for c in spec.read.dense]
            + [CONTEXT_PREFIX + c for c in spec.read.context])


def appended(history: SequenceBlock, member: int, candidates: SequenceBlock, row: int) -> SequenceBlock:
    """One row: ``member``'s history with candidate ``row`` (a flat candidate index) appended last.

    This is the sequence one-by-one scoring feeds the model; the candidate is impression L.
    """
    lo, hi = history.offsets[member], history.offsets[member + 1]
    values = {k: np.concatenate([history.values[k][lo:hi], v[row:row + 1]])
              for k, v in candidates.values.items()}
    return SequenceBlock(
        lengths=np.array([hi - lo + 1], dtype=np.int64),
        rows={"member_id": history.rows["member_id"][member:member + 1], "num_targets": np.ones(1, np.int64)},
        values=values,
    )
