"""The one rule for files read from a folder a user or a download supplied (a SLAKE release,
an ``--also`` source, a model folder, an image folder): the resolved path stays inside the
folder (a symbolic link that leaves it is refused by name), it is a regular file (not a FIFO,
a device such as /dev/zero, or a folder), and it is below a byte limit, checked before a byte
is read."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from infra.errors import UserError

MAX_IMAGE_BYTES = 256 * 2**20   # an image file; a 50-megapixel 16-bit DICOM is 100 MB
MAX_TEXT_BYTES = 64 * 2**20     # a JSON annotation, config or tokenizer file
MAX_WEIGHTS_BYTES = 16 * 2**30  # a safetensors weights file


class SourceError(UserError, OSError):
    """A file the rule refuses; the message names it and why."""


def checked(path: str | Path, limit: int, root: str | Path | None = None, what: str = "file") -> Path:
    """``path`` resolved, after the rule; raises SourceError (FileNotFoundError if missing)."""
    path = Path(path)
    real = path.resolve()
    if root is not None and not real.is_relative_to(Path(root).resolve()):
        raise SourceError(f"{what} {path} leads outside {root} (a symbolic link to {real}): refused; copy the file "
                          "into the folder instead")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{what} {path} is not a regular file (a folder, device or pipe): refused")
    if st.st_size > limit:
        raise SourceError(f"{what} {path} is {st.st_size / 2**20:.0f} MB, more than the {limit / 2**20:.0f} MB "
                          "allowed for it: refused")
    return real


def read_bytes(path: str | Path, limit: int, root: str | Path | None = None, what: str = "file") -> bytes:
    real = checked(path, limit, root, what)
    with open(real, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since the check
        raise SourceError(f"{what} {path} is larger than {limit / 2**20:.0f} MB: refused")
    return data
