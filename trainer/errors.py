"""The trainer's user-facing errors (the stage scripts print them and exit with code 2)."""
from __future__ import annotations


class TrainingError(RuntimeError):
    pass


class TrainingInterrupted(TrainingError):
    """Ctrl-C: the message says what was kept."""
