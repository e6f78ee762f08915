"""Feed-SR: a decoder-only transformer over interleaved post and action tokens.

Per impression t: post token X_t (concatenated id embeddings and dense features) and action token A_t (a learned
linear map of the action multi-hot), interleaved as [X_1, A_1, ..., X_T, A_T]. The prediction for
t is read at X_t's output: X_t sees every earlier post and action and itself, never A_t (its own
label). Context features join after the last block (late fusion), then the multi-task head.

``backbone=attnmvp`` ("Beyond Interleaving", arXiv 2603.10369) keeps the same blocks on half the
sequence: the post tokens alone, every layer's values ``W_v (LN(H_t) + lambda A_t)`` (queries
and keys the item states'), under a strictly causal mask (t sees 0..t-1: its value carries its
own label). After the last block, AttnLFA pools the earlier items' action tokens, keyed by the
item states, and the pooled actions join the item state (concatenated) before the head.
"""

from __future__ import annotations

import torch
from torch import nn

from feedsr.data.batch import Batch, pad_jagged
from feedsr.model.config import ModelConfig, check_width, context_in_tokens, model_width
from feedsr.model.embeddings import (ContextNorm, PostEmbedding, build_context_bins, build_position_bias,
                                     late_context, late_context_dim)
from feedsr.model.heads import build_head
from feedsr.model.rope import LearnedTimeRotation, rope_angles
from feedsr.model.transformer import ActionPooling, Transformer, interleaved_mask, item_mask, strict_attention

FAR_FUTURE_SESSION = 2**40  # session id of padding: never "earlier" than a real session


class FeedSR(nn.Module):
    """Args:
        cfg: model config.
        tables: id feature -> table size (the batch's KJT keys, in order).
        num_actions: width of the action multi-hot.
        context_dim: number of context features.
        task_groups: per task, its gate group index.
        max_seq_len: longest sequence (for learned absolute positions).
        device: ``meta`` defers embedding tables to DistributedModelParallel.
        dense_dim: number of dense features (the post token's numbers).
    """

    def __init__(self, cfg: ModelConfig, tables: dict[str, int], num_actions: int, context_dim: int,
                 task_groups: list[int], max_seq_len: int, device=None, dense_dim: int = 0):
        super().__init__()
        self.cfg = cfg
        token_context = context_dim if context_in_tokens(cfg) else 0
        self.context_norm = ContextNorm(context_dim, cfg.context_norm)
        self.context_bins = build_context_bins(cfg, context_dim)  # late fusion only (ModelConfig checks)
        # Only with dense features: checkpoints of models without them keep their layout.
        self.dense_norm = ContextNorm(dense_dim, cfg.context_norm) if dense_dim else None
        self.posts = PostEmbedding(tables, cfg.embedding_dim, dense_dim + token_context, device)
        width = model_width(cfg, len(tables), context_dim, dense_dim)
        check_width(cfg, width)
        self.input_proj = nn.Linear(self.posts.out_dim, width) if cfg.d_model is not None else nn.Identity()
        self.action_proj = nn.Linear(num_actions, width)
        self.abs_positions = None
        if cfg.position_encoding == "learned":
            # Zero start: nn.Embedding's N(0, 1) would be ~100x the id embeddings (TorchRec inits
            # them at about +-1/sqrt(rows)) and drown the content of every token.
            self.abs_positions = nn.Embedding(max_seq_len, width)
            nn.init.zeros_(self.abs_positions.weight)
        self.transformer = Transformer(width, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                                       cfg.attn_dropout, cfg.residual_init, cfg.residual)
        self.time_rotation = None
        if cfg.rope == "learned_time" and cfg.position_encoding == "rope":
            self.time_rotation = LearnedTimeRotation(width // cfg.num_heads, cfg.rope_base)
        self.interleaved = cfg.backbone == "interleaved"
        self.action_pool = None if self.interleaved else ActionPooling(width, cfg.num_heads)
        fused = late_context_dim(self.context_bins, context_dim) if cfg.late_fusion else 0
        head_in = width * (1 if self.interleaved else 2) + fused
        self.head = build_head(cfg.head, head_in, task_groups)
        self.position_bias = build_position_bias(cfg.position_bias, len(task_groups))

    # The steps of ``forward``, public so that serving (feedsr/serve, its exported programs
    # included) composes the same model: post_tokens -> tokens (interleave) or item_tokens ->
    # rotary (rope) / attention_mask (attend) -> represent (fuse) -> predict.

    @property
    def tokens_per_impression(self) -> int:
        """2 (X_t, A_t) interleaved; 1 (X_t) for attnmvp."""
        return 2 if self.interleaved else 1

    def token_numbers(self, context: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """(*S, E) the numbers of the post tokens from (*S, C) context and (*S, E_d) dense
        features: the dense ones, then the context where the tokens carry it
        (``context_in_tokens``), each standardised."""
        parts = [] if self.dense_norm is None else [self.dense_norm(dense)]
        if context_in_tokens(self.cfg):
            parts.append(self.context_norm(context))
        return torch.cat(parts, dim=-1) if parts else context[..., :0]

    def post_tokens(self, sparse, context: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """(N, D) post tokens X of N impressions (or candidates): their id embeddings and numbers
        (``token_numbers``), projected to the model width; no position yet."""
        return self.input_proj(self.posts(sparse, self.token_numbers(context, dense)))

    def dense_post_tokens(self, ids: list[torch.Tensor], context: torch.Tensor,
                          dense: torch.Tensor) -> torch.Tensor:
        """``post_tokens`` from padded id tensors (one per id feature, in table order, any shape
        ``S``), (*S, C) context and (*S, E_d) dense features: (*S, D). For traced and exported
        programs, which take no KeyedJaggedTensor."""
        return self.input_proj(self.posts.dense(ids, self.token_numbers(context, dense)))

    def interleave(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, T, D) post and action tokens -> (B, 2T, D) [X_1, A_1, ..., X_T, A_T], with the
        learned position of their impression when configured."""
        if self.abs_positions is not None:
            pos = self.abs_positions.weight[:x.shape[1]]  # post and action share the position
            x, a = x + pos, a + pos
        return torch.stack([x, a], dim=2).flatten(1, 2)

    def item_tokens(self, batch: Batch, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (B, T, D) post tokens X and action tokens A (no position yet) and the (B, T)
        mask of real impressions."""
        x = self.post_tokens(batch.sparse, batch.context, batch.dense)  # (N, D)
        a = self.action_proj(batch.actions)  # (N, D)
        x, mask = pad_jagged(x, batch.lengths, max_len)  # (B, T, D)
        a, _ = pad_jagged(a, batch.lengths, max_len)
        return x, a, mask

    def tokens(self, batch: Batch, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleaved (B, 2T, D) tokens and the (B, T) mask of real impressions."""
        x, a, mask = self.item_tokens(batch, max_len)
        return self.interleave(x, a), mask

    def positioned(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) attnmvp item tokens with their learned positions (when configured)."""
        return x if self.abs_positions is None else x + self.abs_positions.weight[:x.shape[1]]

    def action_values(self, a: torch.Tensor) -> torch.Tensor:
        """What attnmvp adds to every layer's value input: lambda * A."""
        return self.cfg.action_value_scale * a

    def attend(self, visible: torch.Tensor):
        """attnmvp's attention step under the item mask ``visible`` (see ``strict_attention``)."""
        # the blocks' own rate (HDET's dropout scalar rescales it there), not the config's
        return strict_attention(visible, self.transformer.blocks[0].attn.attn_dropout if self.training else 0.0)

    def rope(self, positions: torch.Tensor, timestamps: torch.Tensor | None = None,
             origin: torch.Tensor | None = None) -> torch.Tensor | None:
        """RoPE angles (B, S, Dh/2) of tokens at impression index ``positions`` (B or 1, S) and,
        with ``rope=time`` or ``learned_time``, at ``timestamps`` (B, S) seconds, counted from
        ``origin`` (B, 1): the member's first impression. None without RoPE."""
        if self.cfg.position_encoding != "rope":
            return None
        if self.time_rotation is not None:
            return self.time_rotation(positions, timestamps, origin)
        times = None
        if self.cfg.rope == "time":
            times = ((timestamps - origin).double() / self.cfg.rope_time_unit_s).float()
        return rope_angles(positions, self.transformer.blocks[0].attn.head_dim, self.cfg.rope_base, times)

    def rotary(self, batch: Batch, mask: torch.Tensor) -> torch.Tensor | None:
        """The angles of a batch's interleaved tokens (X_t and A_t share t), or None."""
        if self.cfg.position_encoding != "rope":
            return None
        batch_size, max_len = mask.shape
        per = self.tokens_per_impression
        pos = torch.arange(max_len, device=mask.device).repeat_interleave(per)[None]
        if self.cfg.rope == "position":  # every row has the same angles: (1, S, Dh/2) broadcasts
            return self.rope(pos)
        ts, _ = pad_jagged(batch.timestamps, batch.lengths, max_len)
        return self.rope(pos.expand(batch_size, -1), ts.repeat_interleave(per, dim=1), ts[:, :1])

    def attention_mask(self, batch: Batch, max_len: int) -> torch.Tensor | None:
        """(B, 1, 2T, 2T) mask over the interleaved tokens (session / no-history variants); None = causal.
        For attnmvp the (B or 1, 1, T, T) strictly causal item mask (never None)."""
        sessions = None
        if self.cfg.session_mask:  # from the batch: taken before the in-session shuffle
            sessions, _ = pad_jagged(batch.session_ids, batch.lengths, max_len, FAR_FUTURE_SESSION)
        if not self.interleaved:
            return item_mask(batch.lengths, max_len, sessions, self.cfg.use_history)
        return interleaved_mask(batch.lengths, max_len, sessions, self.cfg.use_history)

    def represent(self, batch: Batch) -> torch.Tensor:
        """(N, D) transformer outputs at the post tokens of every impression (flat, in the batch's
        order, padding dropped); for attnmvp (N, 2D), fused with the pooled actions."""
        max_len = int(batch.lengths.max())
        if not self.interleaved:
            return self._represent_items(batch, max_len)
        seq, mask = self.tokens(batch, max_len)
        posts = torch.stack([mask, torch.zeros_like(mask)], dim=2).flatten(1)  # (B, 2T): X_t of real t
        return self.transformer(seq, self.rotary(batch, mask), self.attention_mask(batch, max_len), keep=posts)

    def _represent_items(self, batch: Batch, max_len: int) -> torch.Tensor:
        x, a, mask = self.item_tokens(batch, max_len)
        angles, attend = self.rotary(batch, mask), self.attend(self.attention_mask(batch, max_len))
        # every real item is read, and AttnLFA needs every item's state: no ``keep`` in the blocks
        h = self.transformer(self.positioned(x), angles, attend=attend, value_add=self.action_values(a))
        return self.fuse(h[mask], self.action_pool(h, a, angles, attend, keep=mask))

    @staticmethod
    def fuse(h: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """attnmvp's late fusion of the (N, D) item states and their (N, D) pooled actions."""
        return torch.cat([h, pooled], dim=-1)

    def predict(self, h: torch.Tensor, context: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N, K) task logits from (N, D) representations: the context late-fused (when
        configured), the multi-task head, and the position bias at ``positions`` (in eval mode at
        the configured scoring position)."""
        if self.cfg.late_fusion:
            h = torch.cat([h, late_context(self.context_norm, self.context_bins, context)], dim=-1)
        logits = self.head(h)
        if self.position_bias is not None:
            logits = logits + self.position_bias(positions)
        return logits

    def forward(self, batch: Batch) -> torch.Tensor:
        """(N, K) task logits for every impression of the batch (flat, in the batch's order)."""
        return self.predict(self.represent(batch), batch.context, batch.positions)
