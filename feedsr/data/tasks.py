"""Tasks: which action bits make which prediction target. Defined in the data config, built here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    """One binary prediction target: positive when any of ``actions`` happened.

    Args:
        name: the task's name in logs and metrics.
        actions: action names (from the data's ``action_names``); the label is their OR.
        group: the MMoE gate group ("active", "passive", ...); tasks of one group share a gate.
        weight: the task's weight in the loss.
    """

    name: str
    actions: tuple[str, ...]
    group: str = "default"
    weight: float = 1.0


def build_tasks(task_cfgs: list[dict], action_names: list[str]) -> list[Task]:
    """Validate task configs against the action names; raise ValueError naming the bad entry."""
    if not task_cfgs:
        raise ValueError("data.tasks is empty: define at least one task")
    tasks, seen = [], set()
    for i, cfg in enumerate(task_cfgs):
        cfg = dict(cfg)
        name = cfg.get("name")
        if not name:
            raise ValueError(f"data.tasks[{i}] has no name")
        if name in seen:
            raise ValueError(f"data.tasks: task name '{name}' appears twice")
        actions = tuple(cfg.get("actions") or [name])
        unknown = [a for a in actions if a not in action_names]
        if unknown:
            raise ValueError(
                f"data.tasks '{name}': unknown action(s) {unknown}; known actions: {action_names}"
            )
        weight = float(cfg.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"data.tasks '{name}': weight must be >= 0, got {weight}")
        tasks.append(Task(name, actions, str(cfg.get("group", "default")), weight))
        seen.add(name)
    return tasks


def encode_actions(multi_hot: np.ndarray) -> np.ndarray:
    """(n, M) 0/1 (or bool) per action -> (n,) int64 ``action_bits``: bit i = action i."""
    multi_hot = np.asarray(multi_hot)
    return ((multi_hot != 0).astype(np.int64) << np.arange(multi_hot.shape[1], dtype=np.int64)).sum(axis=1)


def decode_actions(action_bits: np.ndarray, num_actions: int) -> np.ndarray:
    """(n,) int ``action_bits`` -> (n, num_actions) bool multi-hot: the inverse of ``encode_actions``."""
    return ((np.asarray(action_bits)[:, None] >> np.arange(num_actions)) & 1).astype(bool)


def task_bitmasks(tasks: list[Task], action_names: list[str]) -> np.ndarray:
    """(num_tasks,) int64: the bitmask of each task's actions."""
    index = {a: i for i, a in enumerate(action_names)}
    return np.array(
        [sum(1 << index[a] for a in t.actions) for t in tasks], dtype=np.int64
    )


def task_labels(action_bits: np.ndarray, bitmasks: np.ndarray) -> np.ndarray:
    """(n,) action bitmasks -> (n, num_tasks) float32 labels: 1 where any task action is set."""
    return ((action_bits[:, None] & bitmasks[None, :]) != 0).astype(np.float32)


def task_groups(tasks: list[Task]) -> list[str]:
    """The distinct gate groups, in first-seen order."""
    return list(dict.fromkeys(t.group for t in tasks))
