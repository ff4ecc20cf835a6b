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


def _refuse_special(path: str) -> None:
    """``os.replace`` replaces whatever is at ``path``: a folder, a device node (``/dev/null`` as root), a pipe.
    Only a missing path or a regular file (or a link to one) may be replaced."""
    import stat

    from .errors import InputError

    if not os.path.lexists(path):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = os.lstat(path).st_mode  # a broken link: replacing the link itself is fine
        if stat.S_ISLNK(mode):
            return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
        raise InputError(f"{path} is {kind}; refusing to replace it")


@contextmanager
def atomic_path(path: str | os.PathLike, prefix: str = ".uniar_", suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; on success it becomes ``path``, on any error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    _refuse_special(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        _refuse_special(path)  # again: it may have appeared while the file was written
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_input_file(path, what: str = "file", error=None) -> str:
    """``path`` as a readable regular file, or an error (``error``, default InputError) that says what it is
    instead (missing, a folder, a link loop, a device)."""
    import errno
    import stat

    from .errors import InputError

    InputError = error or InputError  # noqa: N806  (the class raised below)

    path = os.fspath(path) if path is not None else ""
    if not path:
        raise InputError(f"no {what} given (empty path)")
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{what} {path} is a symbolic-link loop") from None
        if os.path.islink(path):
            raise InputError(f"{what} {path} is a broken symbolic link") from None
        raise InputError(f"{what} not found: {path}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    return path


def check_output_file(path, what: str = "--out", suffixes: tuple[str, ...] = ()) -> str:
    """Check a destination before any work: a non-empty path whose existing target (if any) is a regular file we
    may replace, whose suffix is one of ``suffixes`` (when given), in a folder where a file can be created
    (probed by creating and removing one, so read-only file systems are found too)."""
    import stat

    from .errors import InputError

    path = os.fspath(path) if path is not None else ""
    if not path.strip():
        raise InputError(f"{what} is empty: give a file path")
    if os.path.lexists(path):
        try:
            st = os.stat(path)
        except OSError:
            raise InputError(f"{what} {path} is a broken or looping symbolic link; remove it or choose another path") \
                from None
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what} {path} is a folder; give a file path inside it")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is not a regular file (a device, pipe or socket); refusing to replace it")
    if suffixes and os.path.splitext(path)[1].lower() not in suffixes:
        raise InputError(f"{what} {path}: use one of the suffixes {', '.join(suffixes)} (the suffix names the format)")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):  # the folders that will be created: probe the nearest existing one
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{what} {path}: {probe} is a file, so no folder can be made there")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".uniar_probe_", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write in {probe} ({e.strerror or e}); choose a writable folder") \
            from None
    return path
