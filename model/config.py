"""Model configuration: one dataclass, derived fields computed in one place.

The full config is stored inside every checkpoint (``asdict``) so evaluation and
the demo rebuild the exact network from the file alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VISION_MODEL = "model/vision_model/clip-vit-base-patch16"
DEFAULT_TOKENIZER = "model/tokenizer"
IMAGE_PLACEHOLDER = "<image>"


def resolve_path(path: str | Path) -> Path:
    """Relative paths are taken from the repository root, so scripts behave the same
    from any working directory (users are told to run them from the root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def minimind_intermediate_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 64 * ceil(8/3 * hidden / 64) (1408 for 512, 2048 for 768)."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


@dataclass
class VLMConfig:
    # language model (MiniMind2 family)
    hidden_size: int = 768
    num_hidden_layers: int = 16
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = 6400
    intermediate_size: int = 0  # 0 = MiniMind sizing, derived in __post_init__
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    # mixture of experts (MiniMind's MoE feed-forward)
    use_moe: bool = False
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    aux_loss_alpha: float = 0.1
    # vision tower and projector
    vision_model: str = DEFAULT_VISION_MODEL
    vision_hidden_size: int = 768  # filled from the tower when the model is built
    image_tokens: int = 196  # patch tokens per image (224 px / 16 px patches, CLS dropped)
    projector: str = "mlp"  # "mlp" (LLaVA-1.5) or "linear" (MiniMind2-V)
    # --train_vision: the last N tower blocks are copied into the model and trained; the feature
    # cache keeps the frozen prefix's output. The block config lets a checkpoint be rebuilt alone.
    vision_tuned_layers: int = 0
    vision_layer_config: dict = field(default_factory=dict)
    # special token ids, always taken from the tokenizer
    image_token_id: int = -1
    pad_token_id: int = 0
    eos_token_id: int = -1

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.intermediate_size <= 0:
            self.intermediate_size = minimind_intermediate_size(self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.projector not in ("mlp", "linear"):
            raise ValueError(f"projector must be 'mlp' or 'linear', got {self.projector!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"checkpoint config has unknown fields {unknown}: it was written by a "
                             "newer version of this toolkit; update the code")
        return cls(**d)
