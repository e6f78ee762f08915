"""Multi-task heads: (N, in_dim) features -> (N, num_tasks) logits.

- ``linear``: one linear map.
- ``mlp``: a shared MLP, then one linear output per task.
- ``dcnv2``: a cross network in parallel with a deep MLP (DCNv2), then the task outputs.
- ``mmoe``: shared experts, one softmax gate per task group (with dropout on the gate weights
  against expert collapse), one tower per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadConfig:
    type: str = "mmoe"  # mmoe | mlp | linear | dcnv2
    hidden_dims: list[int] = field(default_factory=lambda: [64])  # mlp / dcnv2 deep part
    num_experts: int = 4
    expert_dims: list[int] = field(default_factory=lambda: [64])
    tower_dims: list[int] = field(default_factory=lambda: [32])
    gate_dropout: float = 0.1
    cross_layers: int = 2  # dcnv2
    dropout: float = 0.0

    def __post_init__(self):
        if self.type not in ("mmoe", "mlp", "linear", "dcnv2"):
            raise ValueError(f"model.head.type must be mmoe, mlp, linear or dcnv2, got '{self.type}'")
        if self.num_experts < 1:
            raise ValueError(f"model.head.num_experts must be >= 1, got {self.num_experts}")
        if self.cross_layers < 0:
            raise ValueError(f"model.head.cross_layers must be >= 0, got {self.cross_layers}")
        for name in ("hidden_dims", "expert_dims", "tower_dims"):
            check_widths(f"model.head.{name}", getattr(self, name))
        if not 0 <= self.gate_dropout < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"head dropouts must be in [0, 1), got {self.gate_dropout}, {self.dropout}")


def check_widths(key: str, dims: list[int]) -> None:
    """Layer widths of an MLP (an empty list is no layer)."""
    if any(d < 1 for d in dims):
        raise ValueError(f"{key} must hold widths >= 1, got {list(dims)}")


def mlp(in_dim: int, dims: list[int], dropout: float = 0.0) -> tuple[nn.Sequential, int]:
    """ReLU MLP; returns (module, output width)."""
    layers = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    return nn.Sequential(*layers), in_dim


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, num_tasks: int):
        super().__init__()
        self.out = nn.Linear(in_dim, num_tasks)

    def forward(self, x):
        return self.out(x)


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, num_tasks: int, cfg: HeadConfig):
        super().__init__()
        self.body, width = mlp(in_dim, cfg.hidden_dims, cfg.dropout)
        self.out = nn.Linear(width, num_tasks)

    def forward(self, x):
        return self.out(self.body(x))


class CrossNetwork(nn.Module):
    """DCNv2 cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l (full-rank W)."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x0):
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2Head(nn.Module):
    """Parallel DCNv2: [cross(x), deep(x)] -> task logits."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: HeadConfig):
        super().__init__()
        self.cross = CrossNetwork(in_dim, cfg.cross_layers)
        self.deep, width = mlp(in_dim, cfg.hidden_dims, cfg.dropout)
        self.out = nn.Linear(in_dim + width, num_tasks)

    def forward(self, x):
        return self.out(torch.cat([self.cross(x), self.deep(x)], dim=-1))


class MMoEHead(nn.Module):
    """Multi-gate mixture of experts.

    Args:
        in_dim: input width.
        task_groups: per task, the index of its gate group (tasks of a group share one gate).
        cfg: expert/tower sizes, number of experts, gate dropout.
    """

    def __init__(self, in_dim: int, task_groups: list[int], cfg: HeadConfig):
        super().__init__()
        self.register_buffer("task_groups", torch.tensor(task_groups), persistent=False)
        self.num_groups, self.num_experts = max(task_groups) + 1, cfg.num_experts
        experts = [mlp(in_dim, cfg.expert_dims, cfg.dropout) for _ in range(cfg.num_experts)]
        self.experts = nn.ModuleList(e for e, _ in experts)
        expert_width = experts[0][1]
        self.gates = nn.Linear(in_dim, self.num_groups * cfg.num_experts)
        self.gate_dropout = nn.Dropout(cfg.gate_dropout)
        towers = [mlp(expert_width, cfg.tower_dims, cfg.dropout) for _ in task_groups]
        self.towers = nn.ModuleList(nn.Sequential(t, nn.Linear(w, 1)) for t, w in towers)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(N, G, E) softmax weights per gate group (before dropout)."""
        # unflatten, not view(len(x), ..): len() is a Python int, which torch.export would fix
        return self.gates(x).unflatten(-1, (self.num_groups, self.num_experts)).softmax(-1)

    def forward(self, x):
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (N, E, H)
        gates = self.gate_dropout(self.gate_weights(x))  # (N, G, E)
        mixed = torch.einsum("nge,neh->ngh", gates, experts)  # (N, G, H)
        per_task = mixed[:, self.task_groups]  # (N, K, H)
        return torch.cat([tower(per_task[:, k]) for k, tower in enumerate(self.towers)], dim=-1)


def build_head(cfg: HeadConfig, in_dim: int, task_groups: list[int]) -> nn.Module:
    num_tasks = len(task_groups)
    if cfg.type == "linear":
        return LinearHead(in_dim, num_tasks)
    if cfg.type == "mlp":
        return MLPHead(in_dim, num_tasks, cfg)
    if cfg.type == "dcnv2":
        return DCNv2Head(in_dim, num_tasks, cfg)
    return MMoEHead(in_dim, task_groups, cfg)
