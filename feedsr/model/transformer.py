"""Decoder-only transformer blocks: pre-LayerNorm, causal SDPA attention with RoPE, RescaleAndAdd.

A block is ``x + alpha * f(LN(x))`` twice (attention, then FFN), with ``alpha`` a learnable scalar
initialised small: the paper found plain residuals unstable and training without pre-LN collapsing
to AUC 0.5. The two forms it warns against are offered for that comparison (``RESIDUALS``):
``plain`` (``x + f(LN(x))``, pre-LN, no scalar) and ``post_ln`` (``LN(x + f(x))``, the original
Transformer's block, known to need a warm-up).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from feedsr.model.rope import apply_rope

RESIDUALS = ("rescale", "plain", "post_ln")


# (q, k, v, scale) -> (B, H, S, Dh): an attention step; q, k, v are (B, H, S, Dh) after RoPE.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    ``temperature`` multiplies the usual 1/sqrt(head_dim) scale; it is a plain attribute so that a
    trainer (HDET) can vary it without rebuilding the module. ``attend`` replaces the SDPA step
    (serving: candidates over a cached history) while everything else stays this module's own.
    """

    def __init__(self, d_model: int, num_heads: int, attn_dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.attn_dropout = attn_dropout
        self.temperature = 1.0

    @property
    def scale(self) -> float:
        return self.temperature / math.sqrt(self.head_dim)

    def heads(self, x: torch.Tensor, angles: torch.Tensor | None, value_add: torch.Tensor | None = None):
        """Queries, keys, values of x (B, S, D), each (B, H, S, Dh), RoPE applied to q and k.
        ``value_add`` (B, S, D): mixed into the values' input only, ``W_v (x + value_add)``
        (AttnMVP's ``H_t + lambda a_t``, x being the block's attention input: LN(H) pre-LN, H
        with ``post_ln``; queries and keys stay the item states')."""
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if value_add is not None:
            w_v = self.qkv.weight[2 * self.num_heads * self.head_dim:]  # qkv has no bias: W_v is linear
            v = v + F.linear(value_add, w_v).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        return q, k, v

    def forward(
        self, x: torch.Tensor, angles: torch.Tensor | None, attn_mask: torch.Tensor | None,
        attend: Attend | None = None, keep: torch.Tensor | None = None, value_add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, D); angles (B, S, Dh/2) or None; attn_mask (B, 1, S, S) bool or None = causal.
        ``keep`` (B, S) bool: project only those tokens' outputs, returned flat (N, D).
        ``value_add``: see ``heads``."""
        q, k, v = self.heads(x, angles, value_add)
        if attend is not None:
            y = attend(q, k, v, self.scale)
        else:
            y = F.scaled_dot_product_attention(  # (B, H, S, Dh)
                q, k, v,
                attn_mask=attn_mask,
                is_causal=attn_mask is None,
                dropout_p=self.attn_dropout if self.training else 0.0,
                scale=self.scale,
            )
        y = y.transpose(1, 2).flatten(2)  # (B, S, D)
        return self.proj(y if keep is None else y[keep])


class ActionPooling(nn.Module):
    """AttnLFA: at item t, attention pooling of the earlier items' actions, keyed by the item
    states (queries and keys from the transformer's outputs H, values the action tokens a),
    through the same ``Attend`` as the blocks (strict: never t's own action), projected to the
    model width. RoPE angles, when given, rotate its queries and keys as in the blocks."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.ln = nn.LayerNorm(d_model)
        self.qk = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.temperature = 1.0

    @property
    def scale(self) -> float:
        return self.temperature / math.sqrt(self.head_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, H, S, Dh)
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def queries_keys(self, h: torch.Tensor, angles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S, Dh) queries and keys of the item states h (B, S, D), RoPE applied."""
        q, k = self._split_pair(self.qk(self.ln(h)))
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        return q, k

    def _split_pair(self, qk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = qk.chunk(2, dim=-1)
        return self._split(q), self._split(k)

    def values(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, H, S, Dh): the action tokens (B, S, D), split into heads."""
        return self._split(actions)

    def forward(self, h: torch.Tensor, actions: torch.Tensor, angles: torch.Tensor | None, attend: Attend,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) pooled actions at every item, or with ``keep`` only those items, flat (N, D)."""
        q, k = self.queries_keys(h, angles)
        return self.output(attend(q, k, self.values(actions), self.scale), keep)

    def output(self, y: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, S, Dh) attention output -> (B, S, D) (or the kept (N, D)), projected."""
        y = y.transpose(1, 2).flatten(2)
        return self.proj(y if keep is None else y[keep])


class DecoderBlock(nn.Module):
    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, attn_dropout: float,
        residual_init: float, residual: str = "rescale",
    ):
        super().__init__()
        self.residual = residual
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads, attn_dropout)
        self.ln_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))
        self.dropout = nn.Dropout(dropout)
        # RescaleAndAdd's learnable scalars; None: the plain residual (post_ln adds its own way)
        self.alpha_attn = self.alpha_ffn = None
        if residual == "rescale":
            self.alpha_attn = nn.Parameter(torch.tensor(float(residual_init)))
            self.alpha_ffn = nn.Parameter(torch.tensor(float(residual_init)))

    def forward(self, x, angles, attn_mask, attend: Attend | None = None, keep: torch.Tensor | None = None,
                value_add: torch.Tensor | None = None):
        """x (B, S, D) -> (B, S, D); with ``keep`` (B, S) bool, only those tokens, flat (N, D).
        ``value_add`` (B, S, D): added to the attention's value input (``SelfAttention.heads``)."""
        if self.residual == "post_ln":
            y = self.attn(x, angles, attn_mask, attend, keep, value_add)
            x = self.ln_attn((x if keep is None else x[keep]) + self.dropout(y))
            return self.ln_ffn(x + self.dropout(self.ffn(x)))
        y = self.attn(self.ln_attn(x), angles, attn_mask, attend, keep, value_add)
        x = (x if keep is None else x[keep]) + _scaled(self.alpha_attn, self.dropout(y))
        return x + _scaled(self.alpha_ffn, self.dropout(self.ffn(self.ln_ffn(x))))


def _scaled(alpha: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return y if alpha is None else alpha * y


class Transformer(nn.Module):
    """A stack of decoder blocks and a final LayerNorm (pre-LN stacks need one at the end)."""

    def __init__(self, d_model, num_layers, num_heads, ffn_dim, dropout, attn_dropout, residual_init,
                 residual: str = "rescale"):
        super().__init__()
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, num_heads, ffn_dim, dropout, attn_dropout, residual_init, residual)
            for _ in range(num_layers)
        )
        self.ln_out = nn.LayerNorm(d_model)

    def forward(self, x, angles=None, attn_mask=None, keep: torch.Tensor | None = None,
                attend: Attend | None = None, value_add: torch.Tensor | None = None):
        """x (B, S, D) -> (B, S, D), or with ``keep`` (B, S) bool only the kept tokens, flat (N, D).
        ``attend`` replaces every block's SDPA step; ``value_add`` joins every block's values.

        Keys and values need every token in every layer, but the last layer's queries-side work
        (output projection, residual, FFN, final norm) is needed only for the tokens read
        afterwards: Feed-SR reads post tokens, so ``keep`` halves that work and skips padding.
        """
        *blocks, last = self.blocks
        for block in blocks:
            x = block(x, angles, attn_mask, attend, value_add=value_add)
        return self.ln_out(last(x, angles, attn_mask, attend, keep, value_add))


def strict_attention(visible: torch.Tensor, dropout_p: float = 0.0) -> Attend:
    """SDPA where query s sees only the keys ``visible`` (B or 1, 1, S, S) marks, and a query
    that sees none gets a zero output (SDPA's own result for such a row differs between kernels;
    here it is the query's own key, masked out after, so no gradient reaches it either).

    AttnMVP's attention: its values carry the actions, so a token must never see itself.
    """
    empty = ~visible.any(-1, keepdim=True)  # (B, 1, S, 1)
    size = visible.shape[-1]
    mask = visible | (empty & torch.eye(size, dtype=torch.bool, device=visible.device))

    def attend(q, k, v, scale):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return y.masked_fill(empty, 0.0)

    return attend


def item_mask(lengths: torch.Tensor, max_len: int, session_ids: torch.Tensor | None,
              history: bool) -> torch.Tensor:
    """(B or 1, 1, T, T) bool, True = may attend, over AttnMVP's item tokens [X_1, ..., X_T]:
    strictly causal (item t sees items before t, never itself: its value carries its action).
    ``session_ids`` (B, T): only items of earlier sessions; ``history=False``: nothing."""
    if not history:
        return torch.zeros(1, 1, max_len, max_len, dtype=torch.bool, device=lengths.device)
    if session_ids is None:  # right padding sits after every real item: never seen
        return torch.ones(max_len, max_len, dtype=torch.bool, device=lengths.device).tril(-1)[None, None]
    return (session_ids[:, None, :] < session_ids[:, :, None])[:, None]


def interleaved_mask(
    lengths: torch.Tensor, max_len: int, session_ids: torch.Tensor | None, history: bool
) -> torch.Tensor | None:
    """Attention mask over the interleaved sequence [X_1, A_1, ..., X_T, A_T]; None = plain causal.

    Token s belongs to impression s // 2. Plain causal attention already keeps A_t (the label of
    t) from X_t and keeps every real token away from the right padding. Two stricter variants:

    - ``session_ids`` (B, T): X_t and A_t see only impressions of earlier sessions, plus X_t.
      (The alternative to in-session shuffling: the current session is unseen at serving time.)
    - ``history=False``: X_t sees only itself (the "no history" ablation).

    Returns (B, 1, 2T, 2T) bool, True = may attend.
    """
    if session_ids is None and history:
        return None
    imp = torch.arange(2 * max_len, device=lengths.device) // 2  # (S,)
    causal = torch.ones(2 * max_len, 2 * max_len, dtype=torch.bool, device=lengths.device).tril()
    same_impression = imp[:, None] == imp[None, :]
    allowed = (causal & same_impression)[None].expand(len(lengths), -1, -1)  # own X (and self)
    if history:
        sess = session_ids.repeat_interleave(2, dim=1)  # (B, S)
        allowed = allowed | (sess[:, None, :] < sess[:, :, None])
    return allowed[:, None]
