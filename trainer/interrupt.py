"""Ctrl-C and SIGTERM during training: finish the step, save a resume state, stop.

A KeyboardInterrupt raised in the middle of an optimizer step could leave the weights and the
optimizer state half-updated, so the first SIGINT (or SIGTERM) only asks the loop to stop at
the next step boundary; the loop then saves a resume state at that step (atomically) and ends.
A second Ctrl-C stops at once, as Python would (the previous handlers are back by then).
Handlers are installed only in the main thread and always restored, so a caller (a test suite,
a notebook) gets its own Ctrl-C behaviour back."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("train")


class StopRequest:
    def __init__(self):
        self.signal: int | None = None  # the signal that asked to stop, once one has
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self._restore()  # a second Ctrl-C is an ordinary KeyboardInterrupt
        log.warning("%s: stopping after this step and saving a resume state (press Ctrl-C again to stop at once, "
                    "without saving)", signal.Signals(signum).name)

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    @property
    def requested(self) -> bool:
        return self.signal is not None


def signal_name(signum: int | None) -> str:
    return "Ctrl-C" if signum in (None, signal.SIGINT) else signal.Signals(signum).name
