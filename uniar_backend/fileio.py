"""Atomic file writing: a temporary file in the target folder, renamed over the target only when complete, so an
error or a cancel never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


def new_file_mode() -> int:
    """Permissions of a normally created file (0666 minus the umask); ``mkstemp`` alone would leave 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, prefix: str = ".uniar_", suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; on success it becomes ``path``, on any error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
