"""Entry point shared by the two stage scripts. Flags are parsed before the heavy imports
(torch, transformers), so ``--help`` and a flag mistake answer at once."""
from __future__ import annotations

import logging
import os
import signal

from infra.machine import omp_wait_policy, recent_busy_cores
from trainer.config import parse_train_args


def run(stage: str, description: str | None = None) -> int:
    """The stage scripts' entry: exit codes for everything, 130 for Ctrl-C (no traceback)."""
    try:
        return main(stage, description=description)
    except KeyboardInterrupt:
        return 130


def main(stage: str, argv=None, description: str | None = None) -> int:
    """Trains one stage; returns the exit code. A Ctrl-C is re-raised as KeyboardInterrupt once
    its resume state is saved and its message logged, so an in-process caller (a test suite, a
    notebook) is interrupted too (``run`` turns it into exit code 130 for the scripts)."""
    cfg = parse_train_args(stage, argv, description)
    # idle OpenMP threads sleep instead of spinning when another job keeps a core busy (shared, not
    # fought over); alone they spin (faster). Decided before torch starts OpenMP.
    policy = omp_wait_policy(recent_busy_cores())
    if policy:
        os.environ.setdefault("OMP_WAIT_POLICY", policy)
    # local: torch and the trainer load only once the flags are good (--help and typos answer at once)
    import torch.distributed as tdist

    from infra.errors import UserError
    from infra.runtime import setup_logging
    from trainer.errors import TrainingInterrupted
    from trainer.trainer import train
    setup_logging()
    try:
        train(cfg)
    except TrainingInterrupted as exc:
        logging.getLogger("train").error("%s", exc)
        if exc.signal == signal.SIGTERM:
            return 128 + signal.SIGTERM
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:  # before the first step: nothing was written yet
        logging.getLogger("train").error("interrupted before training started; nothing was written")
        raise
    except (UserError, OSError) as exc:  # OSError: a user path (disk full, no permission, not a folder)
        logging.getLogger("train").error("error: %s", exc)
        return 2  # a user-caused error: one named message, exit code 2
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    return 0
