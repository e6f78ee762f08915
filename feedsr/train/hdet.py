"""HDET: hyperparameter-divergent ensemble training (Cheng et al., arXiv 2604.24708).

Each data-parallel replica (rank) trains with its own learning rate around a shared base; every
``converge_every`` steps the replicated parameters are averaged, and (auto-LR) the replicas' losses
move the base: either a factor on the schedule, so the run keeps OneCycle's shape
(``auto_lr_mode=schedule``), or the paper's base learning rate, decayed geometrically toward the
schedule's floor (``geometric``). The losses are each replica's window training loss (the paper's)
or its loss on held-out training rows that every replica scores (``lr_score=clean``).

Implemented as the paper describes it, not as its reference scheduler behaves (see HDET.md): the
spread applies from step 1, averaging does not depend on auto-LR, the decay pulls the base *down*
to the schedule's floor, the global RNG is never reseeded, learning rates stay floats, nothing is
averaged at construction, and a resumed rank keeps its own rank.

Pieces, each small and testable on its own:

- ``multiplier``: rho for a replica index, evenly spaced over [1 - alpha, 1 + alpha], mean 1.
- ``Explorer``: one explored scalar (a param group's learning rate, dropout, weight decay,
  attention temperature): base, velocity, permutation of replica indices, and the meta-update.
- ``HDET``: the trainer-facing object: per-step values, loss windows, the converge.

Sharded embedding tables are never touched: they exist once in the job (each rank owns some rows),
so averaging them would mix unrelated shards and a per-rank learning rate would be a per-shard one.
They keep the sparse optimizer's single learning rate on every rank.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from feedsr.runtime.collectives import all_gather, all_reduce
from feedsr.runtime.config import HDETConfig


def multiplier(index: int, world_size: int, alpha: float) -> float:
    """rho for replica ``index`` of ``world_size``: evenly spaced over [1-alpha, 1+alpha], mean 1."""
    half = (world_size - 1) / 2
    return 1.0 + alpha * (index - half) / max(half, 0.5)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def meta_delta(losses: np.ndarray, values: np.ndarray, sigma: float) -> float:
    """sum_r w_r v_r - mean_r v_r with w = softmax((mean L - L_r) / sigma): > 0 when higher won."""
    weights = softmax((losses.mean() - losses) / sigma)
    return float((weights * values).sum() - values.mean())


class Explorer:
    """One explored scalar: its base, velocity and the permutation of replica indices over ranks.

    ``value(rank)`` = base * rho(perm[rank]). The permutation is re-drawn at every meta-update from
    a generator that every rank seeds and advances identically, so all ranks agree on it without
    communicating.
    """

    def __init__(self, name: str, alpha: float, world_size: int, generator: np.random.Generator,
                 relative: bool = False):
        self.name, self.alpha, self.world_size = name, alpha, world_size
        # relative: ``base`` is a factor on the schedule (starts at 1) | absolute: ``base`` is the
        # value itself, None meaning "follow the schedule" (before S_warm / no auto).
        self.relative = relative
        self.base: float | None = 1.0 if relative else None
        self.velocity = 0.0
        self.perm = generator.permutation(world_size).tolist()

    def rho(self, rank: int) -> float:
        return multiplier(self.perm[rank], self.world_size, self.alpha)

    def value(self, rank: int, scheduled: float) -> float:
        return self.base_value(scheduled) * self.rho(rank)

    def base_value(self, scheduled: float) -> float:
        """The value around which the replicas spread, given the schedule's at this step."""
        if self.relative:
            return self.base * scheduled
        return scheduled if self.base is None else self.base

    def update(self, losses: np.ndarray, values: np.ndarray, sigma: float, beta: float, lam: float,
               decay: float, low: float, high: float, current: float | None = None) -> None:
        """The meta-update: velocity with momentum, decay toward the floor, clamp.

        ``values``: what each replica used over the window, in the units of ``base``; ``current``:
        the base to update when this explorer still follows the schedule (default: their mean).
        """
        delta = meta_delta(losses, values, sigma)
        self.velocity = beta * self.velocity + (1 - beta) * delta
        if self.base is not None:
            current = self.base
        elif current is None:
            current = values.mean()  # mean rho is 1
        self.base = float(min(max((1 - decay) * current + lam * self.velocity, low), high))

    def redraw(self, generator: np.random.Generator) -> None:
        self.perm = generator.permutation(self.world_size).tolist()

    def state_dict(self) -> dict:
        return {"base": self.base, "velocity": self.velocity, "perm": list(self.perm)}

    def load_state_dict(self, state: dict) -> None:
        self.base, self.velocity, self.perm = state["base"], state["velocity"], list(state["perm"])


def decay_factor(current: float, floor: float, remaining_converges: int) -> float:
    """gamma with (1 - gamma)^K = floor / current: the base reaches the floor at the run's end."""
    if remaining_converges < 1 or current <= floor:
        return 0.0
    return 1.0 - (floor / current) ** (1.0 / remaining_converges)


def average_parameters(params: list[torch.Tensor], group=None) -> None:
    """Average replicated parameters across ranks in one coalesced all-reduce, in place."""
    if not params:
        return
    flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
    flat = all_reduce(flat, group=group) / dist.get_world_size(group)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


def add_noise(params: list[torch.Tensor], nu: float, generator: torch.Generator) -> None:
    """Warm noisy start: p += N(0, (nu * ||p|| / sqrt(numel))^2), from a per-rank generator."""
    with torch.no_grad():
        for p in params:
            std = nu * p.norm().item() / math.sqrt(p.numel())
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device) * std)


MAX_DROPOUT = 0.9  # a scaled rate never reaches 1 (all activations dropped)


def scale_dropout(model: nn.Module, scale: float) -> None:
    """Set every dropout rate to ``scale`` x the rate it was configured with (0 stays 0).

    The configured rates (model.dropout, model.attn_dropout, the head's dropout and gate dropout)
    differ on purpose; one explored value written over all of them would switch on dropouts a user
    configured off. The configured rate is remembered on each module at the first call.
    """
    from feedsr.model.transformer import SelfAttention

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.configured_p = getattr(m, "configured_p", m.p)
            m.p = min(m.configured_p * scale, MAX_DROPOUT)
        elif isinstance(m, SelfAttention):
            m.configured_attn_dropout = getattr(m, "configured_attn_dropout", m.attn_dropout)
            m.attn_dropout = min(m.configured_attn_dropout * scale, MAX_DROPOUT)


def set_attention_temperature(model: nn.Module, t: float) -> None:
    from feedsr.model.transformer import ActionPooling, SelfAttention

    for m in model.modules():  # every attention: the blocks' and attnmvp's action pooling
        if isinstance(m, (SelfAttention, ActionPooling)):
            m.temperature = t


class HDET:
    """Per-rank learning rates and scalars, loss windows, and the converge.

    Args:
        cfg: HDET config.
        rank, world_size: this replica and the number of replicas.
        schedule: the OneCycle base schedule (``schedule(step)``, ``.floor``, ``.peak``).
        groups: the dense optimizer's param-group names (one explored learning rate each).
        scalar_bases: starting value of each explored scalar (from the model/optimizer config).
        total_steps: the run's length (for the decay toward the schedule's floor).
    """

    def __init__(self, cfg: HDETConfig, rank: int, world_size: int, schedule, groups: list[str],
                 scalar_bases: dict[str, float], total_steps: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.schedule, self.total_steps = schedule, total_steps
        # Identically seeded on every rank and advanced identically: the permutations agree
        # without communication. Independent of torch's global RNG (dropout stays per rank).
        self.generator = np.random.default_rng(cfg.seed)
        relative = cfg.auto_lr_mode == "schedule"
        self.lr = {g: Explorer(f"lr/{g}", cfg.alpha, world_size, self.generator, relative) for g in groups}
        self.scalars = {}
        for sc in cfg.scalars:
            explorer = Explorer(sc.name, sc.alpha, world_size, self.generator)
            explorer.base = scalar_bases[sc.name]
            high = 2 * explorer.base if sc.max_value is None else sc.max_value
            self.scalars[sc.name] = (sc, explorer, high)
        self.window_sum, self.window_steps = 0.0, 0

    # ------------------------------------------------------------------ per step

    def learning_rates(self, step: int, rank: int | None = None) -> dict[str, float]:
        """Group -> learning rate of ``rank`` (default: this rank) at optimizer step ``step``."""
        rank = self.rank if rank is None else rank
        scheduled = self.schedule(step)
        return {g: e.value(rank, scheduled) for g, e in self.lr.items()}

    def base_learning_rates(self, step: int) -> dict[str, float]:
        scheduled = self.schedule(step)
        return {g: e.base_value(scheduled) for g, e in self.lr.items()}

    def window_learning_rates(self, step: int, window_steps: int) -> np.ndarray:
        """(world, groups): each replica's mean learning rate over the ``window_steps`` optimizer
        steps before ``step``, i.e. the rates the window's losses were trained with (the base and
        the permutations change only at converges, so every rank can compute every rank's)."""
        steps = range(max(step - window_steps, 0), step)
        return np.array([[np.mean([self.learning_rates(s, r)[g] for s in steps]) for g in self.lr]
                         for r in range(self.world_size)])

    def scalar_values(self, rank: int | None = None) -> dict[str, float]:
        rank = self.rank if rank is None else rank
        return {name: e.value(rank, e.base) for name, (_, e, _) in self.scalars.items()}

    def record_loss(self, loss: float) -> None:
        self.window_sum += loss
        self.window_steps += 1

    def is_converge_step(self, step: int) -> bool:
        return step % self.cfg.converge_every == 0

    # ------------------------------------------------------------------ the converge

    def converge(self, step: int, params: list[torch.Tensor], clean_loss: float | None = None) -> dict:
        """After optimizer step ``step``: meta-updates (from the replicas' losses), then averaging.

        A collective: every rank calls it at the same steps. Returns what happened (for logs).
        """
        window = self.window_sum / max(self.window_steps, 1)
        mine = torch.tensor([window, float("nan") if clean_loss is None else clean_loss], dtype=torch.float64)
        losses = all_gather(mine).numpy()  # (W, 2): window loss, clean loss per rank
        report = {"step": step, "window_losses": losses[:, 0].tolist(), "updated": False}
        if clean_loss is not None:
            report["clean_losses"] = losses[:, 1].tolist()
        scores = losses[:, 1] if self.cfg.lr_score == "clean" else losses[:, 0]
        if self.cfg.auto_lr and step >= self.cfg.warm_steps and np.isfinite(scores).all():
            self._update_learning_rates(step, scores, self.window_steps)
            report["updated"], report["lr_losses"] = True, scores.tolist()
        if self.scalars and np.isfinite(losses[:, 1]).all():
            self._update_scalars(losses[:, 1])
        average_parameters(params)
        report["averaged_values"] = sum(p.numel() for p in params)
        self.window_sum, self.window_steps = 0.0, 0
        return report

    def _update_learning_rates(self, step: int, losses: np.ndarray, window_steps: int | None = None) -> None:
        """The meta-update of every group's base from the window's losses and learning rates.

        ``geometric`` (the paper): the base is a learning rate, decayed geometrically toward the
        schedule's floor over the remaining converges. ``schedule``: the base is a factor on the
        schedule, not decayed (the schedule decays), clamped to [1/lr_max_factor, lr_max_factor].
        """
        window = self.cfg.converge_every if window_steps is None else window_steps
        used = self.window_learning_rates(step, window)  # (world, groups)
        remaining = math.ceil(max(self.total_steps - step, 0) / self.cfg.converge_every)
        for i, (g, explorer) in enumerate(self.lr.items()):
            values = used[:, i]
            if explorer.relative:  # in schedule units: what each replica's rate was, over the schedule's
                steps = range(max(step - window, 0), step)
                values = values / np.mean([self.schedule(s) for s in steps])
                explorer.update(losses, values, self.cfg.sigma, self.cfg.beta, self.cfg.lam, 0.0,
                                1 / self.cfg.lr_max_factor, self.cfg.lr_max_factor)
            else:
                current = self.schedule(step) if explorer.base is None else explorer.base
                explorer.update(losses, values, self.cfg.sigma, self.cfg.beta, self.cfg.lam,
                                decay_factor(current, self.schedule.floor, remaining), self.schedule.floor,
                                self.schedule.peak * self.cfg.lr_max_factor, current)
            explorer.redraw(self.generator)

    def _update_scalars(self, clean_losses: np.ndarray) -> None:
        for name, (sc, explorer, high) in self.scalars.items():
            if sc.auto:
                values = np.array([self.scalar_values(r)[name] for r in range(self.world_size)])
                explorer.update(clean_losses, values, self.cfg.sigma, self.cfg.beta, self.cfg.lam,
                                0.0, sc.min_value, high)
            explorer.redraw(self.generator)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.bit_generator.state,
            "lr": {g: e.state_dict() for g, e in self.lr.items()},
            "scalars": {n: e.state_dict() for n, (_, e, _) in self.scalars.items()},
            "window": (self.window_sum, self.window_steps),
            "auto_lr_mode": self.cfg.auto_lr_mode,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore shared state; this object's own rank is kept (never the saving rank's).

        The bases mean different things in the two auto-LR modes (a learning rate, a factor on
        the schedule), so a state resumes only under the mode that saved it (before the modes
        existed, states were geometric)."""
        saved = state.get("auto_lr_mode", "geometric")
        if saved != self.cfg.auto_lr_mode:
            raise ValueError(f"this checkpoint's HDET state was saved with trainer.hdet.auto_lr_mode={saved}; "
                             f"set trainer.hdet.auto_lr_mode={saved} to resume it (now {self.cfg.auto_lr_mode})")
        self.generator.bit_generator.state = state["generator"]
        for g, e in self.lr.items():
            e.load_state_dict(state["lr"][g])
        for n, (_, e, _) in self.scalars.items():
            e.load_state_dict(state["scalars"][n])
        self.window_sum, self.window_steps = state["window"]
