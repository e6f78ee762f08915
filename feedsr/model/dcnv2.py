"""The pointwise DCNv2 baseline: the kind of ranker Feed-SR replaced.

Each impression is scored from its own post features (id embeddings and dense features, as in
Feed-SR's post token), its context and a pooled history: the mean
of (post token + action token) over the member's strictly earlier impressions. A DCNv2 backbone
(cross network in parallel with a deep MLP) feeds the same multi-task heads as Feed-SR, and the
same loss trains it, so the two are compared on equal terms.
"""

from __future__ import annotations

import torch
from torch import nn

from feedsr.data.batch import Batch, pad_jagged
from feedsr.model.config import ModelConfig
from feedsr.model.embeddings import (ContextNorm, PostEmbedding, build_context_bins, build_position_bias,
                                     late_context, late_context_dim)
from feedsr.model.heads import CrossNetwork, build_head, mlp


def causal_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, D) flat per-impression vectors -> (N, D) mean over each row's strictly earlier ones."""
    max_len = int(lengths.max())
    padded, mask = pad_jagged(x, lengths, max_len)  # (B, T, D)
    # exclusive prefix sum (shift, not cumsum - x: that would leak x_t through rounding)
    before = torch.cumsum(torch.cat([torch.zeros_like(padded[:, :1]), padded[:, :-1]], 1), dim=1)
    count = torch.arange(max_len, device=x.device, dtype=x.dtype).clamp(min=1)[None, :, None]
    return (before / count)[mask]


class DCNv2Ranker(nn.Module):
    """Args: as FeedSR (``max_seq_len`` is unused)."""

    def __init__(self, cfg: ModelConfig, tables: dict[str, int], num_actions: int, context_dim: int,
                 task_groups: list[int], max_seq_len: int, device=None, dense_dim: int = 0):
        super().__init__()
        self.cfg = cfg
        self.context_norm = ContextNorm(context_dim, cfg.context_norm)
        self.context_bins = build_context_bins(cfg, context_dim)
        self.dense_norm = ContextNorm(dense_dim, cfg.context_norm) if dense_dim else None
        self.posts = PostEmbedding(tables, cfg.embedding_dim, dense_dim, device)
        width = self.posts.out_dim
        self.action_proj = nn.Linear(num_actions, width)
        in_dim = 2 * width + late_context_dim(self.context_bins, context_dim)  # [post, history mean, context]
        self.cross = CrossNetwork(in_dim, cfg.dcn_cross_layers)
        self.deep, deep_width = mlp(in_dim, cfg.dcn_deep_dims, cfg.dropout)
        self.head = build_head(cfg.head, in_dim + deep_width, task_groups)
        self.position_bias = build_position_bias(cfg.position_bias, len(task_groups))

    def forward(self, batch: Batch) -> torch.Tensor:
        """(N, K) task logits for every impression of the batch."""
        context = late_context(self.context_norm, self.context_bins, batch.context)
        dense = batch.dense if self.dense_norm is None else self.dense_norm(batch.dense)
        post = self.posts(batch.sparse, dense)  # (N, W)
        history = causal_mean(post + self.action_proj(batch.actions), batch.lengths)
        if not self.cfg.use_history:
            history = torch.zeros_like(history)
        x = torch.cat([post, history, context], dim=-1)
        logits = self.head(torch.cat([self.cross(x), self.deep(x)], dim=-1))
        if self.position_bias is not None:
            logits = logits + self.position_bias(batch.positions)
        return logits
