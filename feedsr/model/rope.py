"""Rotary position embeddings (RoPE): the one definition used by every attention in feedsr.

Each pair of channels (2i, 2i+1) of a query/key is rotated by the angle ``p * inv_freq[i]``, so the
dot product of a query at p and a key at p' depends only on p - p'. In Feed-SR a post token and
its action token get the same position p (the impression's index), which makes the action of
impression t exactly as "far" as its post.

The timestamp-aware variant gives half of the channel pairs angles from the impression time
(hours since the member's first impression in the sequence) instead of the index, so that scores
depend on time gaps as well as on how many impressions lie between two tokens.

The learned variant (``LearnedTimeRotation``, SIREN-RoPE, arXiv 2604.24717) turns every pair by
``f(T)_j * omega_j + p * inv_freq_j * lambda``: a small network f of the impression time (its
time of day and of week, and the time since the member's first impression) beside the position's
classic angle. The position part stays relative; the time part is relative in f(T), which is
not a function of time gaps alone by design: 9 am on a Monday is not 9 pm on a Sunday.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DAY_S, WEEK_S = 86_400, 7 * 86_400


def inverse_frequencies(num_pairs: int, base: float, device=None) -> torch.Tensor:
    """(num_pairs,) float32: base^(-i / num_pairs), the classic RoPE spectrum."""
    return base ** (-torch.arange(num_pairs, device=device, dtype=torch.float32) / num_pairs)


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    base: float,
    times: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotation angles, (B, S, head_dim // 2).

    Args:
        positions: (B, S) float, the index of each token's impression.
        head_dim: per-head width (even).
        base: RoPE base (wavelength of the slowest pair, in positions).
        times: (B, S) float hours, or None. When given, the second half of the channel pairs rotate
            by time instead of position.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    num_pairs = head_dim // 2
    if times is None:
        return positions[..., None].float() * inverse_frequencies(num_pairs, base, positions.device)
    by_pos = num_pairs - num_pairs // 2
    pos_angles = positions[..., None].float() * inverse_frequencies(by_pos, base, positions.device)
    time_angles = times[..., None].float() * inverse_frequencies(num_pairs - by_pos, base, times.device)
    return torch.cat([pos_angles, time_angles], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (B, H, S, Dh) by ``angles`` (B or 1, S, Dh/2)."""
    cos = torch.cos(angles)[:, None].to(x.dtype)  # (B, 1, S, Dh/2)
    sin = torch.sin(angles)[:, None].to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2)


class Sine(nn.Module):
    """SIREN's activation, sin(w0 x)."""

    def __init__(self, w0: float):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        return torch.sin(self.w0 * x)


class LearnedTimeRotation(nn.Module):
    """SIREN-RoPE angles (B, S, head_dim // 2): ``f(T) * omega + p * inv_freq * lambda``.

    f is two branches added, a SIREN (sine activations, w0 = 10, SIREN's initialisation) and a
    ReLU MLP, each ``hidden`` wide and two layers deep, over five time features: cos and sin of
    the time of day and of the week (from the absolute timestamp) and the time since the member's
    first impression in units of ``long_unit_s``. omega (one per pair) starts at pi and lambda (one
    gate) at 1, as in the paper; the branches' last layers start at zero, so a new model rotates
    exactly as position RoPE does and learns how much time matters (about 0.2% more parameters).
    """

    def __init__(self, head_dim: int, base: float, hidden: int = 64, long_unit_s: float = 30 * DAY_S,
                 w0: float = 10.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.num_pairs, self.base, self.long_unit_s = head_dim // 2, base, long_unit_s
        self.siren = nn.Sequential(nn.Linear(5, hidden), Sine(w0), nn.Linear(hidden, hidden), Sine(w0),
                                   nn.Linear(hidden, self.num_pairs))
        self.mlp = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, self.num_pairs))
        self.omega = nn.Parameter(torch.full((self.num_pairs,), math.pi))
        self.gate = nn.Parameter(torch.tensor(1.0))  # the paper's lambda on the position angles
        self._init_siren(w0)

    def _init_siren(self, w0: float) -> None:
        first, second, last = self.siren[0], self.siren[2], self.siren[4]
        with torch.no_grad():
            first.weight.uniform_(-1 / first.in_features, 1 / first.in_features)
            bound = math.sqrt(6 / second.in_features) / w0
            second.weight.uniform_(-bound, bound)
            for layer in (last, self.mlp[4]):  # f = 0 at the start: plain position RoPE
                layer.weight.zero_()
                layer.bias.zero_()

    @staticmethod
    def time_features(timestamps: torch.Tensor, origin: torch.Tensor, long_unit_s: float) -> torch.Tensor:
        """(B, S, 5) float32 from (B, S) integer seconds and the (B, 1) origin: the phases are
        taken in integer arithmetic (float32 seconds since 1970 would be off by minutes)."""
        day = (timestamps % DAY_S).double() * (2 * math.pi / DAY_S)
        week = (timestamps % WEEK_S).double() * (2 * math.pi / WEEK_S)
        since = (timestamps - origin).double() / long_unit_s
        return torch.stack([day.cos(), day.sin(), week.cos(), week.sin(), since], dim=-1).float()

    def forward(self, positions: torch.Tensor, timestamps: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """positions (B or 1, S); timestamps (B, S) and origin (B, 1) in seconds."""
        features = self.time_features(timestamps, origin, self.long_unit_s)
        with torch.autocast(features.device.type, enabled=False):  # angles in fp32 under bf16 training
            time_angles = (self.siren(features) + self.mlp(features)) * self.omega
        inv_freq = inverse_frequencies(self.num_pairs, self.base, positions.device)
        return time_angles + positions[..., None].float() * inv_freq * self.gate
