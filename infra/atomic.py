"""Atomic file writes: a temporary file in the target folder, flushed to disk, then renamed
over the target. A crash mid-write leaves the previous file intact and never a truncated
file under the final name."""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def remove_stale_temps(path: str | Path) -> int:
    """Removes hidden temporary files that a killed save of ``path`` left behind (only the
    ones named after this target, never anything else); returns how many."""
    path = Path(path)
    n = 0
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n

