"""Offline ranking metrics per task: AUC, normalized entropy, calibration, and the oracle's.

One accumulator serves validation during training (one process or many) and ``scripts/evaluate.py``:
``update`` keeps every kept row's prediction on the CPU, ``all_gather`` concatenates all ranks' rows,
and ``compute`` scores the whole set at once. AUC is not a sum over shards, so ranks share rows,
not partial metrics; the gathered metrics are exactly those of one process that saw every row.

Example::

    acc = MetricAccumulator(["click", "like"])
    for batch in loader:
        acc.update(model(batch), batch.labels, mask=batch.target_mask, true_probs=batch.true_probs)
    metrics = acc.all_gather().compute()  # {"click": TaskMetrics(...), "like": ...}
    print(format_table(metrics))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from feedsr.runtime.collectives import all_gather_rows

# Predictions are clipped before the log so that one confident mistake costs a large but finite loss.
LOG_LOSS_EPS = 1e-7


@dataclass
class TaskMetrics:
    """Metrics of one task on one split. NaN where undefined (e.g. AUC with one class present).

    ``oracle_auc`` / ``oracle_ne`` score the true probabilities (synthetic data) on the same rows:
    the best any model can do. None when the split has no true probability for the task.
    ``oracle_fraction`` = (AUC - 0.5) / (oracle AUC - 0.5): how much of the way from chance to the
    oracle the model goes (1: as good as the true probabilities).
    """

    task: str
    count: int
    positives: int
    base_rate: float
    mean_pred: float
    auc: float
    logloss: float
    ne: float
    calibration: float
    oracle_auc: float | None = None
    oracle_ne: float | None = None
    oracle_fraction: float | None = None

    def to_dict(self) -> dict:
        """Plain Python values with NaN as None, so the result is strict JSON."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (the Mann-Whitney U statistic over positive-negative pairs), ties counting 1/2.

    Args:
        scores: (n,) float predictions; only their order matters.
        labels: (n,) bool.

    Returns the probability that a random positive outscores a random negative, NaN when only one
    class is present. O(n log n).
    """
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    # Per positive, (negatives below) + (negatives below or tied) is twice its wins with ties as 1/2:
    # an integer, so the sum is exact and the AUC is one rounding away from the true ratio. Sorting
    # both sides first beats ranking with np.argsort: np.sort is SIMD-accelerated, argsort mostly not.
    doubled_wins = int(np.searchsorted(neg, pos, "left").sum() + np.searchsorted(neg, pos, "right").sum())
    return doubled_wins / (2 * len(pos) * len(neg))


def log_loss(preds: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy (nats). preds: (n,) probabilities, labels: (n,) bool. NaN if n = 0."""
    if len(labels) == 0:
        return math.nan
    p = np.clip(preds, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    return float(-np.mean(np.log(np.where(labels, p, 1 - p))))


def binary_entropy(p: float) -> float:
    """Entropy (nats) of a Bernoulli(p): the log loss of always predicting p. NaN unless 0 < p < 1."""
    if not 0 < p < 1:
        return math.nan
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def task_metrics(task: str, preds: np.ndarray, labels: np.ndarray, true_probs: np.ndarray) -> TaskMetrics:
    """Metrics of one task. preds: (n,) float64, labels: (n,) bool, true_probs: (n,) NaN if unknown.

    The oracle is scored only when every row has a true probability; a subset would not be
    comparable with the model's metrics on all rows.
    """
    count, positives = len(labels), int(labels.sum())
    base_rate = positives / count if count else math.nan
    mean_pred = float(preds.mean()) if count else math.nan
    entropy = binary_entropy(base_rate)
    logloss = log_loss(preds, labels)
    auc = roc_auc(preds, labels)
    oracle_auc = oracle_ne = fraction = None
    if count > 0 and not np.isnan(true_probs).any():
        truth = true_probs.astype(np.float64)  # in float32 the clip bound 1 - 1e-7 would round
        oracle_auc, oracle_ne = roc_auc(truth, labels), log_loss(truth, labels) / entropy
        fraction = oracle_fraction(auc, oracle_auc)
    return TaskMetrics(
        task=task,
        count=count,
        positives=positives,
        base_rate=base_rate,
        mean_pred=mean_pred,
        auc=auc,
        logloss=logloss,
        ne=logloss / entropy,
        calibration=mean_pred / base_rate if base_rate > 0 else math.nan,
        oracle_auc=oracle_auc,
        oracle_ne=oracle_ne,
        oracle_fraction=fraction,
    )


def oracle_fraction(auc: float, oracle_auc: float) -> float:
    """(AUC - 0.5) / (oracle AUC - 0.5); NaN when the oracle is no better than chance."""
    return (auc - 0.5) / (oracle_auc - 0.5) if oracle_auc > 0.5 else math.nan


def metrics_by_bucket(task_names: list[str], preds: np.ndarray, labels: np.ndarray, true_probs: np.ndarray,
                      values: np.ndarray, edges: list[int]) -> dict[str, dict[str, TaskMetrics]]:
    """Per bucket of ``values`` (e.g. each impression's history length), every task's metrics.

    Buckets are ``[edges[i], edges[i+1])``, named ``"lo-hi"`` (the last ``"lo+"`` when open:
    ``edges`` may end with ``None``); empty buckets are left out. preds, labels, true_probs: (n, K).
    """
    if any(b is not None and a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must increase, got {edges}")
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        inside = (values >= lo) & (values < hi if hi is not None else True)
        if inside.any():
            name = f"{lo}-{hi - 1}" if hi is not None else f"{lo}+"
            out[name] = {t: task_metrics(t, preds[inside, k], labels[inside, k], true_probs[inside, k])
                         for k, t in enumerate(task_names)}
    return out


def format_buckets(buckets: dict[str, dict[str, TaskMetrics]]) -> str:
    """One line: each bucket's impressions and its tasks' AUCs (``metrics_by_bucket``'s output)."""
    tasks = next(iter(buckets.values()), {})
    return "AUC by history length: " + "; ".join(
        f"{b} ({next(iter(m.values())).count:,}): " + " / ".join(f"{x.auc:.4f}" for x in m.values())
        for b, m in buckets.items()) + f" ({' / '.join(tasks)})"


class MetricAccumulator:
    """Collects per-task predictions and labels over batches, then computes ``TaskMetrics``.

    Args:
        task_names: the K task names, in the order of the columns passed to ``update``.
        from_logits: ``update`` receives logits (sigmoid is applied in float64) rather than
            probabilities.

    Rows are stored on the CPU: predictions as float64 (n, K), labels as bool (n, K), true
    probabilities as float32 (n, K) with NaN where unknown, and each row's history length (n,)
    int64 (-1 where not given), for ``by_history``.
    """

    def __init__(self, task_names: list[str], from_logits: bool = True):
        if not task_names:
            raise ValueError("task_names is empty: need at least one task")
        self.task_names = list(task_names)
        self.from_logits = from_logits
        self._preds: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._true_probs: list[np.ndarray] = []
        self._history: list[np.ndarray] = []

    def update(
        self,
        logits_or_probs: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
        true_probs: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            logits_or_probs: (n, K) model outputs, logits or probabilities per ``from_logits``.
            labels: (n, K) 0/1, float or bool.
            mask: (n,) bool, rows to keep (e.g. the target impressions); None keeps all.
            true_probs: (n, K) true probabilities, NaN where unknown; None if none are known.
            history: (n,) int, each row's history length (e.g. ``Batch.index_in_row``).
        """
        self._check_shapes(logits_or_probs, labels, mask, true_probs)
        if history is not None and history.shape != logits_or_probs.shape[:1]:
            raise ValueError(f"history must be ({len(logits_or_probs)},), got {tuple(history.shape)}")
        keep = slice(None) if mask is None else mask.bool()
        preds = logits_or_probs.detach()[keep].double()
        preds = torch.sigmoid(preds) if self.from_logits else preds
        labels = labels.detach()[keep]
        self._check_values(preds, labels)
        self._preds.append(_host_copy(preds))
        self._labels.append(_host_copy(labels.bool()))
        if true_probs is None:
            self._true_probs.append(np.full(preds.shape, np.nan, np.float32))
        else:
            self._true_probs.append(_host_copy(true_probs.detach()[keep].float()))
        self._history.append(np.full(len(preds), -1, np.int64) if history is None
                             else _host_copy(history.detach()[keep].long()))

    def _check_shapes(self, preds, labels, mask, true_probs) -> None:
        num_tasks = len(self.task_names)
        if preds.dim() != 2 or preds.shape[1] != num_tasks:
            raise ValueError(f"predictions must be (n, {num_tasks}), got {tuple(preds.shape)}")
        for name, t in (("labels", labels), ("true_probs", true_probs)):
            if t is not None and t.shape != preds.shape:
                raise ValueError(f"{name} must match predictions {tuple(preds.shape)}, got {tuple(t.shape)}")
        if mask is not None and mask.shape != preds.shape[:1]:
            raise ValueError(f"mask must be ({preds.shape[0]},), got {tuple(mask.shape)}")

    @staticmethod
    def _check_values(probs: torch.Tensor, labels: torch.Tensor) -> None:
        bad_probs = int((probs.isnan() | (probs < 0) | (probs > 1)).sum())
        if bad_probs:
            raise ValueError(f"{bad_probs} predicted probabilities are NaN or outside [0, 1]")
        bad_labels = int(((labels != 0) & (labels != 1)).sum())
        if bad_labels:
            raise ValueError(f"labels must be 0 or 1, got {bad_labels} other values")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All kept rows: preds (n, K) float64, labels (n, K) bool, true_probs (n, K) float32."""
        k = len(self.task_names)
        return (
            np.concatenate(self._preds) if self._preds else np.empty((0, k), np.float64),
            np.concatenate(self._labels) if self._labels else np.empty((0, k), bool),
            np.concatenate(self._true_probs) if self._true_probs else np.empty((0, k), np.float32),
        )

    def by_history(self, edges: list[int | None]) -> dict[str, dict[str, TaskMetrics]]:
        """Every task's metrics per bucket of history length (``metrics_by_bucket``); rows added
        without a history length fall in no bucket."""
        history = np.concatenate(self._history) if self._history else np.empty(0, np.int64)
        return metrics_by_bucket(self.task_names, *self.arrays(), history, edges)

    def compute(self) -> dict[str, TaskMetrics]:
        """Metrics per task over every row added so far (on this process only)."""
        preds, labels, true_probs = self.arrays()
        return {
            name: task_metrics(name, preds[:, k], labels[:, k], true_probs[:, k])
            for k, name in enumerate(self.task_names)
        }

    def all_gather(self, group: dist.ProcessGroup | None = None) -> MetricAccumulator:
        """An accumulator holding every rank's rows, in rank order; the same on every rank.

        A collective: every rank of ``group`` must call it. Returns ``self`` when torch.distributed
        is not initialized or the group has one rank. ``self`` is left unchanged.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        gathered = MetricAccumulator(self.task_names, from_logits=self.from_logits)
        history = np.concatenate(self._history) if self._history else np.empty(0, np.int64)
        for name, rows in zip(("_preds", "_labels", "_true_probs", "_history"), (*self.arrays(), history)):
            setattr(gathered, name, [all_gather_rows(torch.from_numpy(rows), group).numpy()])
        return gathered


def _host_copy(t: torch.Tensor) -> np.ndarray:
    """A CPU copy: a CPU tensor's .numpy() shares memory, and the caller may reuse its buffers."""
    return t.to("cpu", copy=True).numpy()


_COLUMNS = (  # header, TaskMetrics field, format
    ("task", "task", "{}"),
    ("count", "count", "{:,}"),
    ("base rate", "base_rate", "{:.4f}"),
    ("AUC", "auc", "{:.4f}"),
    ("oracle AUC", "oracle_auc", "{:.4f}"),
    ("oracle frac.", "oracle_fraction", "{:.3f}"),
    ("NE", "ne", "{:.4f}"),
    ("oracle NE", "oracle_ne", "{:.4f}"),
    ("logloss", "logloss", "{:.4f}"),
    ("calibration", "calibration", "{:.3f}"),
)


def format_table(metrics: dict[str, TaskMetrics]) -> str:
    """A fixed-width table, one row per task; "-" where a value is absent or undefined."""
    rows = [[h for h, _, _ in _COLUMNS]]
    for m in metrics.values():
        rows.append([_format_cell(getattr(m, field), fmt) for _, field, fmt in _COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    # Task names left-aligned, numbers right-aligned so their decimal points line up.
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)
