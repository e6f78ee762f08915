"""Rotary position embeddings (RoPE): the one definition used by every attention in feedsr.

Each pair of channels (2i, 2i+1) of a query/key is rotated by the angle ``p * inv_freq[i]``, so the
dot product of a query at p and a key at p' depends only on p - p'. In Feed-SR a post token and
its action token get the same position p (the impression's index), which makes the action of
impression t exactly as "far" as its post.

The timestamp-aware variant gives half of the channel pairs angles from the impression time
(hours since the member's first impression in the sequence) instead of the index, so that scores
depend on time gaps as well as on how many impressions lie between two tokens.
"""

from __future__ import annotations

import torch


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
