"""Atomic file writing: a temporary file in the target folder, renamed over the target only when complete, so an
error or a cancel never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


# A folder written in place of ``DST`` is first ``DST.partial-XXXX`` (the converter); listings never offer one.
PARTIAL = ".partial-"


def new_file_mode() -> int:
    """Permissions of a normally created file (0666 minus the umask); ``mkstemp`` alone would leave 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def path_kind(path: str) -> str:
    """What is at ``path``: "missing", "file" (a regular file, or a link to one), "folder", "special" (a device,
    pipe or socket), "loop" (a symbolic-link loop) or "broken" (a link to nothing)."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "loop"
        return "broken" if os.path.islink(path) else "missing"
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "special"


def _refuse_special(path: str) -> None:
    """``os.replace`` replaces whatever is at ``path``: a folder, a device node (``/dev/null`` as root), a pipe.
    Only a missing path, a regular file (or a link to one) or a broken link may be replaced."""
    from .errors import InputError

    kind = path_kind(path)
    if kind in ("folder", "special", "loop"):
        what = {"folder": "a folder", "loop": "a symbolic-link loop"}.get(
            kind, "not a regular file (a device, pipe or socket)")
        raise InputError(f"{path} is {what}; refusing to replace it")


def walk_folders(top: str, max_folders: int | None = None, skip_hidden: bool = True):
    """``os.walk(top, followlinks=True)`` (sorted; hidden folders skipped unless ``skip_hidden`` is False) that
    enters each real folder once: a link back to a folder already seen (``input/a -> ..``) is not entered again
    (real folders are entered before links), and at most ``max_folders`` folders are visited, so a link loop
    cannot keep it going.  Used for ComfyUI's input folder and for the checkpoint the converter copies (whose
    sub-folders users often share between checkpoints by links)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # real folders before links, so a folder reached both ways is listed under its own name
        dirnames[:] = sorted((d for d in dirnames if not (skip_hidden and d.startswith("."))),
                             key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
        yield dirpath, dirnames, filenames
        if max_folders is not None and len(seen) >= max_folders:
            return


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
    from .errors import InputError

    err = error or InputError
    path = os.fspath(path) if path is not None else ""
    if not path:
        raise err(f"no {what} given (empty path)")
    kind = path_kind(path)
    if kind != "file":
        raise err({"missing": f"{what} not found: {path}", "loop": f"{what} {path} is a symbolic-link loop",
                   "broken": f"{what} {path} is a broken symbolic link",
                   "folder": f"{what} {path} is a folder, not a file",
                   "special": f"{what} {path} is not a regular file (a device, pipe or socket)"}[kind])
    return path


def check_output_file(path, what: str = "--out", suffixes: tuple[str, ...] = ()) -> str:
    """Check a destination before any work: a non-empty path whose existing target (if any) is a regular file we
    may replace, whose suffix is one of ``suffixes`` (when given), in a folder where a file can be created
    (probed by creating and removing one, so read-only file systems are found too)."""
    from .errors import InputError

    path = os.fspath(path) if path is not None else ""
    if not path.strip():
        raise InputError(f"{what} is empty: give a file path")
    kind = path_kind(path)
    if kind in ("loop", "broken"):
        raise InputError(f"{what} {path} is a broken or looping symbolic link; remove it or choose another path")
    if kind == "folder":
        raise InputError(f"{what} {path} is a folder; give a file path inside it")
    if kind == "special":
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
