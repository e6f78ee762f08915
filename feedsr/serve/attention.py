"""Attention steps for shared-context scoring (plugged into the model's own blocks) and their masks.

Every weight, LayerNorm, RoPE rotation, softmax scale and residual scalar used here is the model's
own module or function; what changes is only which keys a query may see. Sequences are laid out as

    [X_1, A_1, ..., X_T, A_T | C_1, ..., C_N]      (2T history tokens, then N candidate post tokens)

and each candidate sees the first ``visible`` history tokens (2L, or fewer: see the scorer) and
itself, never another candidate. With ``model.backbone=attnmvp`` the history is [X_1, ..., X_T]
and a candidate sees the history only (not itself: its value would carry an action it does not
have): plain cross-attention over the cached history (``cached_past``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from feedsr.model.transformer import Attend


def sdpa(mask: torch.Tensor | None) -> Attend:
    """Plain SDPA with a boolean mask (True = may attend); None is causal, as in the model."""
    return functools.partial(_sdpa, mask=mask)


def _sdpa(q, k, v, scale, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


def cached(keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None = None) -> Attend:
    """Candidates over [their member's cached history ; themselves], no (L+N)^2 mask.

    Args:
        keys, values: (B, H, 2T, Dh) one layer's cached history keys (post-RoPE) and values.
        visible: (B,) history tokens each member's candidates see (a prefix of the 2T); None: all.
    """
    bias = nothing = None
    if visible is not None:
        hidden = torch.arange(keys.shape[2], device=keys.device) >= visible[:, None]  # (B, 2T)
        bias = torch.zeros(hidden.shape, dtype=keys.dtype, device=keys.device).masked_fill(
            hidden, float("-inf"))[:, None, None, :]  # (B, 1, 1, 2T)
        nothing = (visible == 0)[:, None, None]  # (B, 1, 1): members whose candidates see no history
    return functools.partial(_cached, keys=keys, values=values, bias=bias, nothing=nothing)


def _cached(q, k, v, scale, keys, values, bias, nothing):
    # One softmax over 2T + 1 logits per candidate, in two parts: the history's (a fused attention
    # kernel that never holds the (N, 2T) scores in memory: passes over those were the cost on
    # CPU) and the candidate's own, merged by their log-sum-exps.
    past, lse = _attention_with_lse(q, keys, values, bias, scale)  # (B, H, N, Dh), (B, H, N)
    if nothing is not None:
        lse = lse.masked_fill(nothing, float("-inf"))  # the kernel gives 0 when every key is hidden
    own = (q * k).sum(-1) * scale  # (B, H, N)
    top = torch.maximum(lse, own)  # for a stable exp
    w_past, w_own = (lse - top).exp()[..., None], (own - top).exp()[..., None]
    return (past * w_past + v * w_own) / (w_past + w_own)  # (B, H, N, Dh)


def cached_past(keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None = None) -> Attend:
    """Candidates over their member's cached history alone (AttnMVP: strictly causal, so not
    over themselves): the first ``visible`` (B,) of the T history tokens (None: all); a candidate
    that sees none gets a zero output, as ``strict_attention`` gives such a token in training."""
    bias = nothing = None
    if visible is not None:
        hidden = torch.arange(keys.shape[2], device=keys.device) >= visible[:, None]  # (B, T)
        bias = torch.zeros(hidden.shape, dtype=keys.dtype, device=keys.device).masked_fill(
            hidden, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
        nothing = (visible == 0)[:, None, None, None]  # (B, 1, 1, 1)
    return functools.partial(_past, keys=keys, values=values, bias=bias, nothing=nothing)


def _past(q, k, v, scale, keys, values, bias, nothing):
    out, _ = _attention_with_lse(q, keys, values, bias, scale)
    return out if nothing is None else out.masked_fill(nothing, 0.0)


def _attention_with_lse(q, k, v, bias, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T scale + bias) v, logsumexp of those logits over the keys): -inf where
    every key is hidden, with a zero output there."""
    if q.device.type == "cpu":  # the flash kernel SDPA runs on CPU, which also returns the lse
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        return out, lse
    # elsewhere written out (the fused GPU kernels that return the lse have device-specific
    # signatures; this path has not been measured on a GPU)
    logits = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    lse = logits.logsumexp(-1)
    weights = (logits - lse.clamp_min(torch.finfo(lse.dtype).min)[..., None]).exp()  # 0 where hidden
    return weights @ v, lse


def shared_context_mask(history: torch.Tensor | None, history_tokens: int, visible: torch.Tensor,
                        num_candidates: int, own: bool = True) -> torch.Tensor:
    """(B, 1, S, S) bool mask over [history | candidates], S = 2T + N; True = may attend.

    Args:
        history: (B or 1, 1, 2T, 2T) the model's mask among history tokens, or None for causal.
        history_tokens: 2T (T for attnmvp).
        visible: (B,) history tokens the candidates of each member see.
        num_candidates: N (per member, padded).
        own: whether a candidate sees itself (not under attnmvp's strictly causal mask).
    """
    batch, size = len(visible), history_tokens + num_candidates
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    causal = torch.ones(history_tokens, history_tokens, dtype=torch.bool).tril()
    mask[:, :history_tokens, :history_tokens] = causal if history is None else history[:, 0]
    mask[:, history_tokens:, :history_tokens] = (torch.arange(history_tokens) < visible[:, None])[:, None]
    if own:
        mask[:, history_tokens:, history_tokens:] = torch.eye(num_candidates, dtype=torch.bool)
    return mask[:, None]


def flex(history_tokens: int, visible: torch.Tensor, num_candidates: int) -> Attend:
    """The shared-context mask as a FlexAttention block mask, for a causal history.

    Blocks that are entirely hidden (above the diagonal, candidate x candidate) are skipped instead
    of being computed and masked. On CPU both the block mask and the kernel need ``torch.compile``
    (eager FlexAttention materializes the full score matrix); the first call per shape compiles.
    """
    def may_attend(b, h, q, kv):
        return torch.where(q < history_tokens, kv <= q, (kv < visible[b]) | (kv == q))

    size = history_tokens + num_candidates
    block_mask = _compiled_flex()[0](may_attend, len(visible), None, size, size, device="cpu")
    return functools.partial(_flex, block_mask=block_mask)


@functools.cache
def _compiled_flex():
    """(create_block_mask, flex_attention), compiled once per process (then once per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(create_block_mask, dynamic=False), torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, scale, block_mask):
    return _compiled_flex()[1](q, k, v, block_mask=block_mask, scale=scale)
