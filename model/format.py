"""What every checkpoint reader and writer shares, below them all (model/checkpoint.py for .pth
files, model/pretrained.py for model folders): the format header, the tokenizer file names a
checkpoint may hold, the error type and the NaN/Inf guard. Importing nothing of the toolkit, it
keeps checkpoint, pretrained and vlm free of import circles."""
from __future__ import annotations

import torch

from infra.errors import UserError

FORMAT = "medical-vlm"
FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    pass


# The only names a stored tokenizer file may have. A checkpoint is shared data: nothing
# read from it may choose a path, so any other key (``/etc/x``, ``../../x``, ``a/b``) is refused.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                             "merges.txt"})


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf (one host sync per call)."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    ok = torch.stack([tensors[k].isfinite().all() for k in names]).cpu()
    return [k for k, good in zip(names, ok.tolist()) if not good]


def ensure_finite(tensors: dict[str, torch.Tensor], what: str):
    """The save/load guard: a file is never written from, or loaded with, NaN/Inf weights."""
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) hold NaN or Inf values (e.g. {bad[0]})")
