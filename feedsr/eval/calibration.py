"""Per-task isotonic calibration: a monotone map from the model's probability to the observed rate.

Fitted on one split's target impressions (the validation split: ``python -m feedsr.serve
calibrate``) as the model scores them in eval mode, i.e. at the serving position (the position
bias at ``score_position``), and applied to scores (``python -m feedsr.serve score
--calibration``) and metrics (``scripts/evaluate.py --calibration``). A monotone map keeps each
task's ranking, so AUC changes only where it merges scores into ties; it moves NE and the
calibration ratio (mean prediction / base rate).

The fit is pool-adjacent-violators over the predictions sorted ascending; the map is linear
between the fitted steps' ends and constant beyond the fitted range, clipped to [1e-6, 1 - 1e-6]
so that no prediction becomes a certainty. Stored as JSON: per task, the knots ``x`` and ``y``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feedsr.eval.metrics import MetricAccumulator, TaskMetrics, task_metrics

CLIP = 1e-6


def isotonic(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots (x, y), both non-decreasing, of the isotonic regression of ``labels`` on ``preds``.

    Pool adjacent violators over the rows sorted by prediction (ties in prediction pooled first,
    so equal scores map to one value): each pooled block is a step at its mean label, from its
    smallest to its largest prediction.
    """
    if len(preds) == 0:
        raise ValueError("cannot fit a calibration on no rows")
    order = np.argsort(preds, kind="stable")
    x, y = preds[order].astype(np.float64), labels[order].astype(np.float64)
    values, starts = np.unique(x, return_index=True)
    sums, counts = np.add.reduceat(y, starts), np.diff(np.append(starts, len(x))).astype(np.float64)
    # blocks on a stack: (sum, count, lowest x, highest x); merge while the means decrease
    block_sum, block_count, lo, hi = [], [], [], []
    for s, c, v in zip(sums, counts, values):
        block_sum.append(s), block_count.append(c), lo.append(v), hi.append(v)
        while len(block_sum) > 1 and block_sum[-2] * block_count[-1] >= block_sum[-1] * block_count[-2]:
            s2, c2, h2 = block_sum.pop(), block_count.pop(), hi.pop()
            lo.pop()
            block_sum[-1] += s2
            block_count[-1] += c2
            hi[-1] = h2
    means = np.array(block_sum) / np.array(block_count)
    knots_x = np.column_stack([lo, hi]).ravel()
    knots_y = np.repeat(np.clip(means, CLIP, 1 - CLIP), 2)
    return knots_x, knots_y


@dataclass
class Calibration:
    """Per-task knots, and where they were fitted (for the record)."""

    tasks: dict[str, tuple[np.ndarray, np.ndarray]]
    fitted_on: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, preds: np.ndarray, labels: np.ndarray, task_names: list[str], fitted_on: dict | None = None):
        """preds, labels: (n, K) in the order of ``task_names``."""
        tasks = {name: isotonic(preds[:, k], labels[:, k]) for k, name in enumerate(task_names)}
        return cls(tasks, dict(fitted_on or {}))

    def check_tasks(self, task_names: list[str]) -> None:
        """ValueError naming the tasks of ``task_names`` the calibration has no map for."""
        missing = [t for t in task_names if t not in self.tasks]
        if missing:
            raise ValueError(f"the calibration has no map for task(s) {missing} (it has {sorted(self.tasks)})")

    def apply(self, probs: np.ndarray, task_names: list[str]) -> np.ndarray:
        """(n, K) calibrated probabilities; every task of ``task_names`` needs a map."""
        self.check_tasks(task_names)
        out = np.empty(probs.shape, np.float64)
        for k, name in enumerate(task_names):
            x, y = self.tasks[name]
            out[:, k] = np.interp(probs[:, k], x, y)
        return out

    def to_dict(self) -> dict:
        return {"fitted_on": self.fitted_on,
                "tasks": {t: {"x": x.tolist(), "y": y.tolist()} for t, (x, y) in self.tasks.items()}}

    @classmethod
    def from_dict(cls, record: dict, source: str = "calibration") -> Calibration:
        try:
            tasks = {t: (np.asarray(k["x"], np.float64), np.asarray(k["y"], np.float64))
                     for t, k in record["tasks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: not a calibration written by `python -m feedsr.serve calibrate` "
                             f"({type(e).__name__}: {e})") from None
        for task, (x, y) in tasks.items():
            if x.ndim != 1 or len(x) != len(y) or len(x) == 0 or (np.diff(x) < 0).any() or (np.diff(y) < 0).any():
                raise ValueError(f"{source}: task '{task}': knots must be non-empty, of equal length and "
                                 "non-decreasing")
        return cls(tasks, record.get("fitted_on", {}))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a calibration file written by `python -m feedsr.serve calibrate` "
                             f"({type(e).__name__}: {e})") from None
        return cls.from_dict(record, str(path))


def calibrated_metrics(calibration: Calibration, predicted: MetricAccumulator) -> dict[str, TaskMetrics]:
    """The metrics of ``predicted``'s rows after the calibration."""
    preds, labels, truth = predicted.arrays()
    tasks = predicted.task_names
    after = calibration.apply(preds, tasks)
    return {t: task_metrics(t, after[:, k], labels[:, k], truth[:, k]) for k, t in enumerate(tasks)}
