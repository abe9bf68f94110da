"""The learning-rate schedule: warm-up, then constant, cosine or warm-up-stable-decay."""
from __future__ import annotations

import math

from trainer.config import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then the peak held to the end (``constant``), or down to ``min_lr_ratio``
    of the peak: by a cosine over the rest of the run, or (``wsd``: warm-up, stable, decay) held
    at the peak and decayed linearly over the last ``decay_ratio`` of the steps only, so the
    run's length changes only where it ends."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.learning_rate
    if cfg.schedule == "wsd":
        decay_start = max(warm, total - round(cfg.decay_ratio * total))
        if step < decay_start:
            return cfg.learning_rate
        progress = (step - decay_start + 1) / max(1, total - decay_start)
        return cfg.learning_rate * (lo + (1 - lo) * (1 - progress))
    progress = (step - warm) / max(1, total - warm)
    return cfg.learning_rate * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))
