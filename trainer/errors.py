"""The trainer's user-facing errors (the stage scripts print them and exit with code 2)."""
from __future__ import annotations

from infra.errors import UserError


class TrainingError(UserError, RuntimeError):
    pass


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM: the message says what was kept; ``signal`` is the signal number that
    asked to stop (None for a KeyboardInterrupt raised some other way)."""

    def __init__(self, message: str, signal: int | None = None):
        super().__init__(message)
        self.signal = signal
