"""Entry point shared by the two stage scripts."""
from __future__ import annotations

import logging

import torch.distributed as tdist

from dataset.contract import DataError
from dataset.images import ImageReadError
from model.checkpoint import CheckpointError
from model.runtime import DeviceError, setup_logging
from model.vision import VisionTowerNotFound
from trainer.config import parse_train_args
from trainer.trainer import TrainingError, TrainingInterrupted, train


def main(stage: str, argv=None, description: str | None = None) -> int:
    setup_logging()
    cfg = parse_train_args(stage, argv, description)
    try:
        train(cfg)
    except TrainingInterrupted as exc:
        logging.getLogger("train").error("%s", exc)
        return 130
    except KeyboardInterrupt:  # before the first step: nothing was written yet
        logging.getLogger("train").error("interrupted before training started; nothing was written")
        return 130
    except (FileNotFoundError, DataError, ImageReadError, CheckpointError, VisionTowerNotFound, TrainingError,
            DeviceError) as exc:
        logging.getLogger("train").error("error: %s", exc)
        return 1
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


