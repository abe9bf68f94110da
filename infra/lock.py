"""One writer per output: a lock file beside what a run writes (``out/.medical_vlm_768.lock``
for a training run, ``dataset/.convert.lock`` for a conversion). A second run into the same
output is refused with the holder's PID; a lock left by a killed run (its process is gone) is
taken over with a note.

The lock file appears complete or not at all: the owner is written to a private temporary file
which is then hard-linked into place (link fails if the lock exists), so no second process can
ever read an empty or half-written owner and mistake it for a stale lock. A lock file that
cannot be read is still never taken over while it is younger than ``YOUNG_SECONDS``."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from infra.errors import UserError

log = logging.getLogger(__name__)


class LockError(UserError, RuntimeError):
    pass


YOUNG_SECONDS = 10.0  # an unreadable lock younger than this belongs to a run that is starting


def _owner_file(path: Path, owner: dict) -> str:
    """A complete temporary file beside ``path`` holding ``owner``, to be linked or renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create(path: Path, owner: dict) -> bool:
    """Creates ``path`` holding ``owner``, atomically; False when it exists already."""
    tmp = _owner_file(path, owner)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take_over(path: Path, seen: str, me: dict) -> bool:
    """Replaces the stale lock ``path`` (whose text read ``seen``) by ours, unless it changed
    meanwhile. Take-overs are serialised by an flock on a guard file beside it, so two runs that
    both found the same stale lock cannot both take it: the second finds the first's owner."""
    with open(path.with_name(path.name + ".guard"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            now = path.read_bytes()
        except FileNotFoundError:
            return _create(path, me)
        if now != seen:
            return False
        os.replace(_owner_file(path, me), path)  # never a moment without a lock file
        return True


@contextlib.contextmanager
def output_lock(path: str | Path, what: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        if _create(path, me):
            break
        try:
            seen = path.read_bytes()
        except FileNotFoundError:
            continue  # released in between: try again
        try:
            holder = json.loads(seen.decode("utf-8"))
            pid, host = int(holder["pid"]), str(holder.get("host", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            holder, pid, host = {}, -1, ""
        young = pid <= 0 and _age(path) < YOUNG_SECONDS
        if young or (pid > 0 and (host != me["host"] or _alive(pid))):
            raise LockError(f"{what} is in use by another run (PID {pid if pid > 0 else '?'} on {host or '?'}: "
                            f"{holder.get('command', '?')}); wait for it to finish, or choose another output. "
                            f"If no such run exists, delete {path}") from None
        if _take_over(path, seen, me):
            log.warning("note: taking over %s, left by a run that is no longer running (PID %s)", path, pid)
            break
    else:
        raise LockError(f"{what}: could not take the lock {path} (another run keeps taking it); try again")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
