"""Gradient-boosted trees (LightGBM) on each impression's own features: the line a practitioner
draws first, scored like the neural models.

One binary model per task, trained on the target impressions of the training split and early
stopped on the validation split (as the LightGBM reference of ``../shared/data/kuairand/README.md``),
each impression described by its own columns only, no history: every ``ctx_<name>`` and
``dense_<name>`` as a number,
every ``cat_<name>`` as a LightGBM categorical (as its code when it has more than 64 levels), and
optionally ``item_ids`` / ``author_ids``. The impressions are the ones the neural models are scored on: rows cut to the data
config's ``max_seq_len`` as the reader cuts them, then each row's target tail. The metrics are
``feedsr.eval.metrics.task_metrics``, the neural models' own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feedsr.data.batch import BatchSpec
from feedsr.data.reader import open_file, read_block, split_files
from feedsr.data.schema import CATEGORICAL_PREFIX, CONTEXT_PREFIX, DENSE_PREFIX, DataError
from feedsr.data.tasks import task_bitmasks, task_labels
from feedsr.eval.metrics import TaskMetrics, task_metrics

ID_COLUMNS = ("item_ids", "author_ids")


@dataclass
class TreeConfig:
    """LightGBM settings (the reference line's: learning rate 0.05, 31 leaves, early stopping).

    Args:
        max_rounds: boosting rounds at most; ``early_stopping`` rounds without a better validation
            log loss stop a task's model.
        threads: LightGBM threads (0: its default, every core).
    """

    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.9
    max_rounds: int = 2000
    early_stopping: int = 50
    threads: int = 0
    seed: int = 0

    def __post_init__(self):
        checks = {"learning_rate": self.learning_rate > 0, "num_leaves": self.num_leaves >= 2,
                  "min_data_in_leaf": self.min_data_in_leaf >= 1, "max_rounds": self.max_rounds >= 1,
                  "early_stopping": self.early_stopping >= 1, "threads": self.threads >= 0,
                  "feature_fraction": 0 < self.feature_fraction <= 1,
                  "bagging_fraction": 0 < self.bagging_fraction <= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TreeConfig: bad value for {bad[0]}: {getattr(self, bad[0])}")

    def params(self) -> dict:
        return {"objective": "binary", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                "min_data_in_leaf": self.min_data_in_leaf, "feature_fraction": self.feature_fraction,
                "bagging_fraction": self.bagging_fraction, "bagging_freq": 1, "seed": self.seed,
                "num_threads": self.threads, "verbosity": -1, "deterministic": True}


@dataclass
class Impressions:
    """The target impressions of a split as a feature matrix.

    Args:
        columns: the feature names, in matrix order.
        categorical: those of them that are categorical (codes).
        features: (n, F) float64 (codes of categoricals are exact in float64).
        labels: (n, K) bool, per task.
        true_probs: (n, K) float32, NaN where unknown (synthetic data knows them).
        history: (n,) impressions before each one in its (cut) row: for breakdowns by history length.
    """

    columns: list[str]
    categorical: list[str]
    features: np.ndarray
    labels: np.ndarray
    true_probs: np.ndarray
    history: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.labels)


MAX_CATEGORIES = 64


def feature_columns(spec: BatchSpec, ids: bool, max_categories: int = MAX_CATEGORIES) -> tuple[list[str], list[str]]:
    """(every feature column, the ones LightGBM splits as categories) of impressions under ``spec``.

    A categorical column with more than ``max_categories`` levels (its table size) is given as its
    code, a number: LightGBM's category splits overfit on many levels. On KuaiRand's wide features
    (three member codes of 112-1,408 levels) as categories: validation AUC click / long_view / like
    0.7455 / 0.7491 / 0.8650, early stopped after 39-81 rounds; as numbers 0.7545 / 0.7571 / 0.8872.
    """
    columns = [CATEGORICAL_PREFIX + c for c in spec.read.categorical]
    if ids:
        columns = [c for c in ID_COLUMNS if c in spec.id_table_sizes] + columns
    categorical = [c for c in columns if spec.id_table_sizes[c] <= max_categories]
    numbers = [CONTEXT_PREFIX + c for c in spec.read.context] + [DENSE_PREFIX + c for c in spec.read.dense]
    return numbers + columns, categorical


def read_impressions(data_dir: str | Path, split: str, spec: BatchSpec, max_seq_len: int,
                     ids: bool = False, max_categories: int = MAX_CATEGORIES) -> Impressions:
    """The target impressions of ``data_dir/split`` (rows cut to their newest ``max_seq_len``);
    ``ids``, ``max_categories``: see ``feature_columns``."""
    columns, categorical = feature_columns(spec, ids, max_categories)
    masks = task_bitmasks(list(spec.tasks), list(spec.read.action_names))
    parts: dict[str, list[np.ndarray]] = {"x": [], "y": [], "p": [], "h": []}
    for path in split_files(data_dir, split):
        info = open_file(path, spec.read)
        for row_group in range(len(info.row_group_rows)):
            block = read_block(info, row_group, spec.read).truncate(max_seq_len)
            targets = block.target_flags()
            values = block.values
            parts["x"].append(np.stack([values[c][targets].astype(np.float64) for c in columns], axis=1))
            parts["y"].append(task_labels(values["action_bits"][targets], masks).astype(bool))
            parts["p"].append(spec.true_probs(values, len(targets))[targets])
            parts["h"].append(block.index_in_row()[targets])
    if not parts["y"] or sum(len(y) for y in parts["y"]) == 0:
        raise DataError(f"{data_dir}/{split}: no target impressions")
    return Impressions(columns, categorical, np.concatenate(parts["x"]), np.concatenate(parts["y"]),
                       np.concatenate(parts["p"]), np.concatenate(parts["h"]))


@dataclass
class TreeResult:
    """Per task: its metrics on the reported split (validation unless another is given), the
    boosting rounds kept, the seconds spent."""

    metrics: dict[str, TaskMetrics]
    rounds: dict[str, int]
    seconds: dict[str, float]
    preds: np.ndarray = field(repr=False)  # (n, K) probabilities of the reported split's impressions
    importance: dict[str, dict[str, float]] = field(repr=False, default_factory=dict)  # task -> gain per feature


def fit_and_score(train: Impressions, valid: Impressions, task_names: list[str], config: TreeConfig,
                  progress=print, report: Impressions | None = None) -> TreeResult:
    """One model per task on ``train``, early stopped on ``valid`` and scored on ``report``
    (default ``valid``: e.g. a test split, for figures of a model not chosen on them)."""
    import lightgbm as lgb

    report = valid if report is None else report
    for part in (valid, report):
        if train.columns != part.columns:
            raise ValueError(f"train and held-out impressions have different columns: {train.columns} vs {part.columns}")
    preds = np.zeros(report.labels.shape, np.float64)
    metrics, rounds, seconds, importance = {}, {}, {}, {}
    for k, task in enumerate(task_names):
        start = time.perf_counter()
        if train.labels[:, k].all() or not train.labels[:, k].any():
            raise DataError(f"task {task}: the training impressions are all {bool(train.labels[0, k])}: "
                            "nothing to learn")
        data = lgb.Dataset(train.features, train.labels[:, k].astype(np.float64), feature_name=train.columns,
                           categorical_feature=train.categorical, free_raw_data=False)
        held_out = lgb.Dataset(valid.features, valid.labels[:, k].astype(np.float64), reference=data)
        booster = lgb.train(config.params(), data, num_boost_round=config.max_rounds, valid_sets=[held_out],
                            callbacks=[lgb.early_stopping(config.early_stopping, verbose=False)])
        preds[:, k] = booster.predict(report.features, num_iteration=booster.best_iteration)
        metrics[task] = task_metrics(task, preds[:, k], report.labels[:, k], report.true_probs[:, k])
        rounds[task], seconds[task] = int(booster.best_iteration), time.perf_counter() - start
        gains = booster.feature_importance("gain")
        importance[task] = {c: float(g) for c, g in zip(train.columns, gains / max(gains.sum(), 1e-12))}
        progress(f"trees: {task}: AUC {metrics[task].auc:.4f}, {rounds[task]} rounds, {seconds[task]:.1f} s")
    return TreeResult(metrics, rounds, seconds, preds, importance)
