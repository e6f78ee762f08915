"""Model config (``conf/model/*.yaml``), validated when the config is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from feedsr.model.heads import HeadConfig


@dataclass
class PositionBiasConfig:
    enabled: bool = True
    num_positions: int = 60  # the paper's K
    score_position: int | None = 5  # fixed position used when scoring (the paper: 5); null: logged


@dataclass
class ModelConfig:
    """Feed-SR (``name: feedsr``) or the pointwise DCNv2 baseline (``name: dcnv2``).

    ``d_model: null`` means no input projection: the model width is the concatenated post feature
    width (the paper's choice); an integer adds a linear projection to that width.
    """

    name: str = "feedsr"
    embedding_dim: int = 16  # every id table (TorchRec's EmbeddingCollection needs one width)
    d_model: int | None = None
    num_layers: int = 2
    num_heads: int = 2
    ffn_dim: int = 256
    dropout: float = 0.1
    attn_dropout: float = 0.0
    residual_init: float = 0.1  # alpha in x + alpha * f(LN(x))
    position_encoding: str = "rope"  # rope | learned | none
    rope_base: float = 10_000.0
    rope_time: bool = False  # half of the rotary pairs turn with time instead of position
    rope_time_unit_s: float = 3600.0
    late_fusion: bool = True  # False: context features go into the post tokens instead
    session_mask: bool = False  # hide same-session tokens (alternative to in-session shuffle)
    session_gap_s: int = 1800
    use_history: bool = True  # False: each impression sees only itself (ablation)
    head: HeadConfig = field(default_factory=HeadConfig)
    position_bias: PositionBiasConfig = field(default_factory=PositionBiasConfig)
    dcn_cross_layers: int = 3  # dcnv2 baseline backbone
    dcn_deep_dims: list[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self):
        if self.name not in ("feedsr", "dcnv2"):
            raise ValueError(f"model.name must be feedsr or dcnv2, got '{self.name}'")
        if self.position_encoding not in ("rope", "learned", "none"):
            raise ValueError(
                f"model.position_encoding must be rope, learned or none, got '{self.position_encoding}'"
            )
        for name in ("embedding_dim", "num_layers", "num_heads", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.attn_dropout < 1:
            raise ValueError(f"model dropouts must be in [0, 1), got {self.dropout}, {self.attn_dropout}")
        if self.rope_time and self.position_encoding != "rope":
            raise ValueError("model.rope_time needs model.position_encoding=rope")

    def check_width(self, width: int) -> None:
        """Validate heads against the actual model width (known once the features are)."""
        if width % self.num_heads:
            raise ValueError(
                f"model width {width} is not divisible by model.num_heads={self.num_heads} "
                "(set model.d_model to add a projection, or change embedding_dim/num_heads)"
            )
        if self.position_encoding == "rope" and (width // self.num_heads) % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {width // self.num_heads}")
