"""Entry point shared by the two stage scripts."""
from __future__ import annotations

import logging

import torch.distributed as tdist

from dataset.contract import DataError
from dataset.images import ImageReadError
from model.checkpoint import CheckpointError
from model.runtime import setup_logging
from model.vision import VisionTowerNotFound
from trainer.config import parse_train_args
from trainer.trainer import TrainingError, train


def main(stage: str, argv=None, description: str | None = None) -> int:
    setup_logging()
    cfg = parse_train_args(stage, argv, description)
    try:
        train(cfg)
    except (FileNotFoundError, DataError, ImageReadError, CheckpointError, VisionTowerNotFound, TrainingError) as exc:
        logging.getLogger("train").error("error: %s", exc)
        return 1
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


