"""One writer per output: a lock file beside what a run writes (``out/.medical_vlm_768.lock``
for a training run, ``dataset/.convert.lock`` for a conversion). A second run into the same
output is refused with the holder's PID; a lock left by a killed run (its process is gone) is
taken over with a note."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class LockError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def output_lock(path: str | Path, what: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
                pid, host = int(holder["pid"]), str(holder.get("host", ""))
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = {}, -1, ""
            if pid > 0 and (host != me["host"] or _alive(pid)):
                raise LockError(f"{what} is in use by another run (PID {pid} on {host or '?'}: "
                                f"{holder.get('command', '?')}); wait for it to finish, or choose another output. "
                                f"If no such run exists, delete {path}") from None
            log.warning("note: taking over %s, left by a run that is no longer running (PID %s)", path, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
