"""Process-level helpers shared by the stage scripts: logging, device choice, seeding."""
from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: int = logging.INFO):
    """Plain messages on stderr; under torchrun only rank 0 prints below WARNING."""
    logging.basicConfig(level=level if is_rank0() else logging.WARNING, format="%(message)s",
                        stream=sys.stderr, force=True)


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
