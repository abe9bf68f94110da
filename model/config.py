"""Model configuration: one dataclass, derived fields computed in one place.

The full config is stored inside every checkpoint (``asdict``) so evaluation and
the demo rebuild the exact network from the file alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VISION_MODEL = "model/vision_model/clip-vit-base-patch16"
DEFAULT_TOKENIZER = "model/tokenizer"
IMAGE_PLACEHOLDER = "<image>"
# the last commit with the removed model levers (--projector film, --patch_loss, --train_vision; docs/learning.md)
REMOVED_AT = "27ee718"
PROJECTORS = ("mlp", "linear")
# Bounds of a config's sizes (checked before any allocation; far above MiniMind2's 768 x 16).
LIMITS = {"hidden_size": (1, 8192), "num_hidden_layers": (1, 256), "num_attention_heads": (1, 256),
          "num_key_value_heads": (1, 256), "vocab_size": (1, 1_000_000), "intermediate_size": (0, 65536),
          "max_position_embeddings": (1, 262_144), "vision_hidden_size": (1, 8192), "image_tokens": (1, 16_384),
          "n_routed_experts": (1, 256), "n_shared_experts": (0, 64), "num_experts_per_tok": (1, 256),
          "dropout": (0.0, 1.0), "rope_theta": (1.0, 1e12),
          "rms_norm_eps": (0.0, 1.0), "aux_loss_alpha": (0.0, 100.0),
          "image_token_id": (-1, 1_000_000), "pad_token_id": (-1, 1_000_000), "eos_token_id": (-1, 1_000_000)}
MAX_PARAMETERS = 4_000_000_000


def resolve_path(path: str | Path) -> Path:
    """Relative paths are taken from the repository root, so scripts behave the same
    from any working directory (users are told to run them from the root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def user_path(value, default=None, may_be_remote: bool = False):
    """A path the user typed on the command line counts from where they stand (the working
    directory); the toolkit's own defaults (``dataset/``, ``out/``, ``model/vision_model/``)
    stay relative to the repository (``resolve_path``), so the guide's commands work from any
    folder. ``may_be_remote``: the value may also be a hub id; it becomes a path only when it
    exists here. Special words (none, pretrain, auto, '') are kept."""
    if not isinstance(value, str) or value in ("", "none", "pretrain", "auto") or value == default:
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    here = Path.cwd() / p
    if may_be_remote and not (here.exists() or here.is_symlink()):
        return value
    return str(here)


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
    # special token ids, always taken from the tokenizer
    image_token_id: int = -1
    pad_token_id: int = 0
    eos_token_id: int = -1

    def __post_init__(self):
        """Every field's type and range is checked here, before anything is allocated: a config
        read from a file (a shared model folder) must not be able to ask for 90 GB."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else f.type.__name__
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                  "bool": isinstance(value, bool), "str": isinstance(value, str),
                  "dict": isinstance(value, dict), "list": isinstance(value, list)}.get(kind, True)
            if not ok:
                raise ValueError(f"{f.name} must be a {kind}, got {value!r:.60}")
            if f.name in LIMITS and not LIMITS[f.name][0] <= value <= LIMITS[f.name][1]:
                raise ValueError(f"{f.name} must be between {LIMITS[f.name][0]} and {LIMITS[f.name][1]}, "
                                 f"got {value}")
        if self.intermediate_size <= 0:
            self.intermediate_size = minimind_intermediate_size(self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        if self.intermediate_size > LIMITS["hidden_size"][1] * 8:
            raise ValueError(f"intermediate_size {self.intermediate_size} is out of range")
        if self.parameter_estimate() > MAX_PARAMETERS:
            raise ValueError(f"this config describes about {self.parameter_estimate() / 1e9:.1f}B parameters, more "
                             f"than the {MAX_PARAMETERS / 1e9:.0f}B this toolkit builds")

    def parameter_estimate(self) -> int:
        """Language-model parameters, roughly (embedding + attention + feed-forward per layer)."""
        experts = (self.n_routed_experts + self.n_shared_experts) if self.use_moe else 1
        layer = 4 * self.hidden_size ** 2 + 3 * self.hidden_size * max(self.intermediate_size, 1) * experts
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = dict(d)
        if d.get("projector") == "film":
            raise ValueError(f"projector 'film' was removed (it lost its measurements, docs/learning.md); load this "
                             f"model with the toolkit at commit {REMOVED_AT}")
        d.pop("patch_labels", None)  # a training-only head (--patch_loss, removed): answers never used it
        if d.pop("vision_tuned_layers", 0):
            raise ValueError(f"this model fine-tuned the vision tower's last blocks (--train_vision, removed: it lost "
                             f"its measurements, docs/learning.md); load it with the toolkit at commit {REMOVED_AT}")
        d.pop("vision_layer_config", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"checkpoint config has unknown fields {unknown}: it was written by a "
                             "newer version of this toolkit; update the code")
        return cls(**d)
