"""Post tokens from id features: a TorchRec EmbeddingCollection over the batch's KeyedJaggedTensor.

Every id feature (item, author, each categorical) has its own table; a post's token is the
concatenation of its features' embeddings and its numbers: the ``dense_`` features (a content
embedding, say), plus the context features when they are not late-fused.
TorchRec's EmbeddingCollection requires one embedding dimension for all of its tables.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from feedsr.model.config import PositionBiasConfig


def table_name(feature: str) -> str:
    return f"table_{feature}"


class ContextNorm(nn.Module):
    """(..., C) context (or dense) features -> asinh((x - mean) / std) per feature, or the features
    as they are when disabled (``model.context_norm=false``).

    Context features come in their own units: rates of rare actions with a spread of 1e-3 beside
    counts with a spread of 15 (KuaiRand). Fed raw, the first layer sees the former as constants
    and the latter dominate. Standardised alone, the same rare-action rates reach 100-150 standard
    deviations in their tails, and a cross network's products of such inputs blow up (DCNv2's
    training loss went to 400 in its first steps). asinh keeps the order and the centre (slope 1
    at 0) and takes the tails to about log(2|z|). The moments are the training split's (``fit``,
    before step 1) and are buffers, saved with the weights, so that evaluation, serving and
    exported programs apply the same map.

    Args:
        dim: number of context features.
        enabled: False: the identity (the buffers are kept, unused, for one state-dict layout).
    """

    # Below this spread a feature is a constant: standardising it would blow up rounding noise.
    MIN_STD = 1e-6

    def __init__(self, dim: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the map from (C,) per-feature mean and standard deviation."""
        if mean.shape != self.shift.shape or std.shape != self.shift.shape:
            raise ValueError(f"moments of shapes {tuple(mean.shape)} and {tuple(std.shape)} "
                             f"for {len(self.shift)} features (a context or dense standardisation)")
        self.shift.copy_(mean)
        self.scale.copy_(torch.where(std > self.MIN_STD, 1.0 / std.clamp(min=self.MIN_STD), 1.0))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return context
        return torch.asinh((context - self.shift) * self.scale)


class QuantileEncoding(nn.Module):
    """(..., C) standardised context -> (..., C * out_dim): each feature's piecewise-linear
    encoding over K bins (Gorishniy et al., "On Embeddings for Numerical Features in Tabular Deep
    Learning", 2022), embedded by its own linear map and a ReLU.

    Bin k of a feature reads clamp((z - e_k) / (e_{k+1} - e_k), 0, 1) for its edges e_0..e_K, the
    training split's quantiles (``fit``, before step 1; buffers, saved with the weights). A tree
    splits a feature at any threshold for free; an MLP over the bare number has to build every
    threshold from ReLUs of linear maps that the other features share. With the bins, a
    threshold near an edge is one weight, a step where many impressions tie (a count of 0) one
    bin of zero width. The edges start evenly over [-3, 3], so an unfitted model still runs.

    Args:
        dim: number of context features.
        bins: K, bins per feature.
        out_dim: numbers per feature.
    """

    # Edges closer than this make a step: the bin reads 0 below its edge and 1 above.
    MIN_WIDTH = 1e-6

    def __init__(self, dim: int, bins: int, out_dim: int):
        super().__init__()
        self.register_buffer("edges", torch.linspace(-3.0, 3.0, bins + 1).repeat(dim, 1))
        self.weight = nn.Parameter(torch.empty(dim, bins, out_dim))
        self.bias = nn.Parameter(torch.zeros(dim, out_dim))
        nn.init.uniform_(self.weight, -bins ** -0.5, bins ** -0.5)  # nn.Linear's start, per feature

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0] * self.weight.shape[2]

    @torch.no_grad()
    def fit(self, edges: torch.Tensor) -> None:
        """Set the (C, K + 1) per-feature edges (ascending; ties allowed)."""
        if edges.shape != self.edges.shape:
            raise ValueError(f"bin edges of shape {tuple(edges.shape)} for {tuple(self.edges.shape)} "
                             "(features, bins + 1)")
        if (edges.diff(dim=1) < 0).any():
            raise ValueError("bin edges must be ascending per feature")
        self.edges.copy_(edges)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        left, width = self.edges[:, :-1], self.edges.diff(dim=1).clamp(min=self.MIN_WIDTH)
        encoded = ((z.unsqueeze(-1) - left) / width).clamp(0.0, 1.0)  # (..., C, K)
        out = torch.einsum("...ck,ckd->...cd", encoded, self.weight) + self.bias
        return torch.relu(out).flatten(-2)


def build_context_bins(cfg, context_dim: int) -> QuantileEncoding | None:
    """The late-fused context's quantile encoding (``model.context_bins``), or None when off."""
    if not cfg.context_bins or not context_dim:
        return None
    return QuantileEncoding(context_dim, cfg.context_bins, cfg.context_bin_dim)


def late_context(norm: ContextNorm, bins: QuantileEncoding | None, context: torch.Tensor) -> torch.Tensor:
    """(..., C) raw context -> what the head reads: standardised, then its quantile encoding."""
    z = norm(context)
    return z if bins is None else torch.cat([z, bins(z)], dim=-1)


def late_context_dim(bins: QuantileEncoding | None, context_dim: int) -> int:
    return context_dim + (0 if bins is None else bins.out_dim)


class PostEmbedding(nn.Module):
    """(KJT of N impressions, (N, E) numbers) -> (N, out_dim) post features: the id embeddings,
    then the numbers.

    Args:
        tables: id feature -> number of rows (ids arrive already taken modulo this size).
        embedding_dim: width of every table.
        numeric_dim: numbers concatenated into the token (dense features, and the context ones
            when they are not late-fused).
        device: where tables are created; ``meta`` defers allocation to DistributedModelParallel.
    """

    def __init__(self, tables: dict[str, int], embedding_dim: int, numeric_dim: int = 0, device=None):
        super().__init__()
        self.features = list(tables)
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=table_name(f), embedding_dim=embedding_dim, num_embeddings=n, feature_names=[f]
                )
                for f, n in tables.items()
            ],
            device=device,
        )
        self.numeric_dim = numeric_dim
        self.out_dim = embedding_dim * len(self.features) + numeric_dim

    def forward(self, sparse: KeyedJaggedTensor, numbers: torch.Tensor) -> torch.Tensor:
        looked_up = self.ec(sparse)
        parts = [looked_up[f].values() for f in self.features]  # each (N, embedding_dim)
        if self.numeric_dim:
            parts.append(numbers)
        return torch.cat(parts, dim=-1)

    def dense(self, ids: list[torch.Tensor], numbers: torch.Tensor) -> torch.Tensor:
        """The same from plain id tensors (one per feature, in ``features`` order, each of shape
        S, taken modulo the table size as ``collate`` takes them) and (*S, E) numbers: (*S, out_dim).
        Reads the EmbeddingCollection's own tables (an unsharded model)."""
        tables = self.ec.embeddings
        parts = []
        for feature, values in zip(self.features, ids, strict=True):
            weight = tables[table_name(feature)].weight
            parts.append(torch.nn.functional.embedding(values % weight.shape[0], weight))
        if self.numeric_dim:
            parts.append(numbers)
        return torch.cat(parts, dim=-1)


class PositionBias(nn.Module):
    """A learned logit offset per (feed position, task) for the first ``num_positions`` positions.

    Training adds the offset of the position the post was shown at, so the towers need not explain
    position bias. Scoring (eval mode) adds the offset of one fixed ``score_position`` for every
    candidate (the paper: 5), which keeps predictions calibrated for a slot near the top; with
    ``score_position=None`` scoring uses the logged position too (offline evaluation against
    logged labels, e.g. next to an oracle that knows the position). Unknown and deeper positions
    share one extra learned row. ``PositionBiasConfig`` checks the arguments.
    """

    def __init__(self, num_positions: int, num_tasks: int, score_position: int | None):
        super().__init__()
        self.num_positions, self.score_position = num_positions, score_position
        self.offsets = nn.Embedding(num_positions + 1, num_tasks)
        nn.init.zeros_(self.offsets.weight)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(N,) feed positions -> (N, K) offsets."""
        if not self.training and self.score_position is not None:
            positions = torch.full_like(positions, self.score_position)
        known = (positions >= 0) & (positions < self.num_positions)
        return self.offsets(torch.where(known, positions, self.num_positions))


def build_position_bias(cfg: PositionBiasConfig, num_tasks: int) -> PositionBias | None:
    """The model's position bias, or None when disabled."""
    return PositionBias(cfg.num_positions, num_tasks, cfg.score_position) if cfg.enabled else None
