"""Model config (``conf/model/*.yaml``), validated when the config is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from feedsr.model.heads import HeadConfig, check_widths
from feedsr.model.transformer import RESIDUALS

BACKBONES = ("interleaved", "attnmvp")
ROPES = ("position", "time", "learned_time")

if TYPE_CHECKING:
    from feedsr.data.config import DataConfig


@dataclass
class PositionBiasConfig:
    enabled: bool = True
    num_positions: int = 60  # the paper's K
    score_position: int | None = 5  # fixed position used when scoring (the paper: 5); null: logged

    def __post_init__(self):
        if self.num_positions < 1:
            raise ValueError(f"model.position_bias.num_positions must be >= 1, got {self.num_positions}")
        if self.score_position is not None and not 0 <= self.score_position < self.num_positions:
            raise ValueError(f"model.position_bias.score_position must be in [0, {self.num_positions}) "
                             f"or null, got {self.score_position}")


@dataclass
class ModelConfig:
    """Feed-SR (``name: feedsr``) or the pointwise DCNv2 baseline (``name: dcnv2``).

    ``d_model: null`` means no input projection: the model width is the concatenated post feature
    width (the paper's choice); an integer adds a linear projection to that width. Sessions (for
    ``session_mask``) come with the batch, cut by ``data.session_gap_s``.
    """

    name: str = "feedsr"
    # interleaved: [X_1, A_1, ..., X_T, A_T] (the paper) | attnmvp: items only, values X_t + lambda A_t
    # under a strictly causal mask, then AttnLFA pooling of past actions ("Beyond Interleaving")
    backbone: str = "interleaved"
    action_value_scale: float = 1.0  # attnmvp's lambda (its authors: stable for 0.5..1)
    embedding_dim: int = 16  # every id table (TorchRec's EmbeddingCollection needs one width)
    d_model: int | None = None
    num_layers: int = 2
    num_heads: int = 2
    ffn_dim: int = 256
    dropout: float = 0.1
    attn_dropout: float = 0.0
    residual_init: float = 0.1  # alpha in x + alpha * f(LN(x))
    residual: str = "rescale"  # rescale: x + alpha f(LN(x)) | plain: x + f(LN(x)) | post_ln: LN(x + f(x))
    position_encoding: str = "rope"  # rope | learned | none
    rope_base: float = 10_000.0
    # position: the classic angles | time: half of the pairs turn with time instead |
    # learned_time: SIREN-RoPE, every pair turns by a learned function of time beside the position
    rope: str = "position"
    rope_time: bool | None = None  # the former spelling of rope=time (older configs, checkpoints)
    rope_time_unit_s: float = 3600.0
    late_fusion: bool = True  # False: context features go into the post tokens instead
    # True: the context features go into the post tokens as well (beside late fusion), so that
    # attention sees each past impression's point-in-time numbers, not only its ids
    token_context: bool = False
    context_norm: bool = True  # context features: asinh of their standard scores (training moments)
    # > 0: the late-fused context is also encoded piecewise-linearly over this many quantile bins
    # per feature (the training split's), each feature embedded by its own linear map to
    # context_bin_dim numbers (PLE, Gorishniy et al. 2022); 0: the standardised context alone
    context_bins: int = 0
    context_bin_dim: int = 4
    session_mask: bool = False  # hide same-session tokens (alternative to in-session shuffle)
    use_history: bool = True  # False: each impression sees only itself (ablation)
    head: HeadConfig = field(default_factory=HeadConfig)
    position_bias: PositionBiasConfig = field(default_factory=PositionBiasConfig)
    dcn_cross_layers: int = 3  # dcnv2 baseline backbone
    dcn_deep_dims: list[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self):
        if self.name not in ("feedsr", "dcnv2"):
            raise ValueError(f"model.name must be feedsr or dcnv2, got '{self.name}'")
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {', '.join(BACKBONES)}, got '{self.backbone}'")
        if self.position_encoding not in ("rope", "learned", "none"):
            raise ValueError(
                f"model.position_encoding must be rope, learned or none, got '{self.position_encoding}'"
            )
        for name in ("embedding_dim", "num_layers", "num_heads", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model is not None and self.d_model < 1:
            raise ValueError(f"model.d_model must be >= 1 or null, got {self.d_model}")
        if not 0 <= self.dropout < 1 or not 0 <= self.attn_dropout < 1:
            raise ValueError(f"model dropouts must be in [0, 1), got {self.dropout}, {self.attn_dropout}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"model.residual must be one of {', '.join(RESIDUALS)}, got '{self.residual}'")
        self._check_scales()
        if self.dcn_cross_layers < 0:
            raise ValueError(f"model.dcn_cross_layers must be >= 0, got {self.dcn_cross_layers}")
        check_widths("model.dcn_deep_dims", self.dcn_deep_dims)

    def _check_scales(self) -> None:
        # Written as `not lo <= x < inf`: NaN fails every comparison, so it is rejected too.
        if not 0 <= self.action_value_scale < math.inf:
            raise ValueError(f"model.action_value_scale must be >= 0, got {self.action_value_scale}")
        if self.context_bins < 0 or self.context_bins == 1:
            raise ValueError(f"model.context_bins must be 0 (off) or >= 2, got {self.context_bins}")
        if self.context_bins and not self.late_fusion:
            raise ValueError("model.context_bins encodes the late-fused context: it needs model.late_fusion=true")
        if self.context_bin_dim < 1:
            raise ValueError(f"model.context_bin_dim must be >= 1, got {self.context_bin_dim}")
        if not 0 <= self.residual_init < math.inf:
            raise ValueError(f"model.residual_init must be >= 0, got {self.residual_init}")
        if not 1 < self.rope_base < math.inf:  # base <= 1: frequencies base**(-i/n) do not fall
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")
        if not 0 < self.rope_time_unit_s < math.inf:
            raise ValueError(f"model.rope_time_unit_s must be > 0, got {self.rope_time_unit_s}")
        if self.rope not in ROPES:
            raise ValueError(f"model.rope must be one of {', '.join(ROPES)}, got '{self.rope}'")
        if self.rope_time:
            if self.rope == "learned_time":
                raise ValueError("model.rope_time=true (the former spelling of model.rope=time) "
                                 "conflicts with model.rope=learned_time")
            self.rope = "time"
        self.rope_time = None  # read once: model.rope is the one setting from here on
        if self.rope != "position" and self.position_encoding != "rope":
            raise ValueError(f"model.rope={self.rope} needs model.position_encoding=rope")


def model_width(cfg: ModelConfig, num_id_features: int, context_dim: int, dense_dim: int = 0) -> int:
    """The transformer's width: ``d_model``, or else the post token's, one embedding per id
    feature (ids and categoricals), the dense features, and the context features when the tokens
    carry them (``context_in_tokens``)."""
    if cfg.d_model is not None:
        return cfg.d_model
    return cfg.embedding_dim * num_id_features + dense_dim + (context_dim if context_in_tokens(cfg) else 0)


def context_in_tokens(cfg: ModelConfig) -> bool:
    """Whether the post tokens carry the context features: without late fusion (instead of it),
    or with ``model.token_context`` (beside it)."""
    return cfg.token_context or not cfg.late_fusion


def check_width(cfg: ModelConfig, width: int) -> None:
    """The attention heads must split ``width`` evenly, into halves RoPE can rotate in pairs."""
    if width % cfg.num_heads:
        raise ValueError(
            f"model width {width} is not divisible by model.num_heads={cfg.num_heads} "
            "(set model.d_model to add a projection, or change embedding_dim/num_heads)"
        )
    head_dim, split = width // cfg.num_heads, f"model width {width} / model.num_heads={cfg.num_heads}"
    if cfg.position_encoding == "rope" and head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension: {split} = {head_dim}")
    if cfg.rope == "time" and head_dim < 4:  # one pair turns with position, at least one with time
        raise ValueError(f"model.rope=time needs a head dimension >= 4: {split} = {head_dim}")


def check_model_config(model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    """What the model config must satisfy given the data config, checked from the two configs
    alone (before any data is generated or read): the width against the attention heads, and no
    context in the tokens under the in-session shuffle."""
    if model_cfg.name != "feedsr":  # the DCNv2 baseline has no attention
        return
    num_id_features = len(data_cfg.id_tables) + len(data_cfg.categorical)
    check_width(model_cfg, model_width(model_cfg, num_id_features, len(data_cfg.context), len(data_cfg.dense)))
    if context_in_tokens(model_cfg) and data_cfg.session_shuffle and not model_cfg.session_mask:
        # The shuffle puts a later impression j of the session before target i; j's point-in-time
        # context counts i's own actions (they happened before j), and i would read them in X_j.
        raise ValueError(
            "the context in the post tokens (model.token_context=true or model.late_fusion=false) with "
            "data.session_shuffle=true leaks each target's own label: a shuffled later impression of the "
            "session comes first, and its point-in-time context counts the target's actions. Set "
            "data.session_shuffle=false or model.session_mask=true")
