"""Dense optimizer with parameter groups, and the OneCycle base learning-rate schedule.

Groups (HDET explores a learning rate per group): ``transformer`` (decayed transformer matrices,
attnmvp's action pooling too),
``dense`` (other decayed matrices) and ``no_decay`` (norms, biases, residual scalars, position
tables: weight decay on them only shrinks what they encode). Embedding tables are not here: a
fused optimizer updates them inside backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from feedsr.runtime.sharding import is_sharded_param

GROUPS = ("transformer", "dense", "no_decay")
NO_DECAY_NAMES = ("position_bias", "abs_positions")


def group_of(name: str, param: torch.Tensor) -> str:
    if param.ndim < 2 or any(n in name for n in NO_DECAY_NAMES):
        return "no_decay"
    attention = ".transformer." in f".{name}" or name.startswith("action_pool.")  # attnmvp's pooling
    return "transformer" if attention else "dense"


def dense_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Group name -> [(name, parameter)] of every trainable non-embedding parameter."""
    groups = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        if param.requires_grad and not is_sharded_param(name):
            groups[group_of(name, param)].append((name, param))
    return {g: ps for g, ps in groups.items() if ps}


def build_dense_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW/Adam over the dense groups; each group carries its ``name``."""
    groups = [
        {"params": [p for _, p in params], "name": g,
         "weight_decay": 0.0 if g == "no_decay" else cfg.weight_decay}
        for g, params in dense_parameters(model).items()
    ]
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@dataclass(frozen=True)
class OneCycle:
    """The base learning rate at a step: cosine warm-up to ``peak``, then cosine decay.

    Same curve as ``torch.optim.lr_scheduler.OneCycleLR`` (two phases, cosine annealing), but a pure
    function of the step, so HDET can multiply it per rank and group and a resume needs no state.
    """

    peak: float
    total_steps: int
    warmup_pct: float = 0.1
    div_factor: float = 25.0
    final_div_factor: float = 1e3
    constant: bool = False

    @property
    def start(self) -> float:
        return self.peak / self.div_factor

    @property
    def floor(self) -> float:
        return self.start / self.final_div_factor

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.constant:
            return self.peak
        warm_end = max(float(self.warmup_pct * self.total_steps) - 1, 0.0)  # no warm-up: peak at 0
        if step <= warm_end:
            return _cos(self.start, self.peak, step / warm_end if warm_end > 0 else 1.0)
        span = self.total_steps - 1 - warm_end
        return _cos(self.peak, self.floor, min((step - warm_end) / span, 1.0) if span > 0 else 1.0)


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def schedule_of(cfg, total_steps: int) -> OneCycle:
    return OneCycle(cfg.lr, total_steps, cfg.warmup_pct, cfg.div_factor, cfg.final_div_factor,
                    constant=cfg.schedule == "constant")


def set_group_values(optimizer: torch.optim.Optimizer, key: str, values: dict[str, float]) -> None:
    """Set ``key`` (lr, weight_decay) of the named param groups present in ``values``."""
    for group in optimizer.param_groups:
        if group["name"] in values:
            group[key] = values[group["name"]]
