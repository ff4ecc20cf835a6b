"""Token files in ComfyUI's input folder: listing and safe paths.  No ComfyUI import."""

from __future__ import annotations

import os

from ..uniar_backend.fileio import walk_folders

TOKEN_EXT = ".safetensors"


# The listing runs on every /object_info: it stops after this many folders or files, whatever the input folder
# holds (links included).
MAX_FOLDERS = 5000
MAX_FILES = 10000


def list_token_files(input_dir: str) -> list[str]:
    """``.safetensors`` files in ComfyUI's input folder and its sub-folders (relative paths with ``/``)."""
    out = []
    if not os.path.isdir(input_dir):
        return out
    for dirpath, _, filenames in walk_folders(input_dir, MAX_FOLDERS):
        for f in filenames:
            if f.lower().endswith(TOKEN_EXT) and not f.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, f), input_dir).replace(os.sep, "/")
                if plain_relative(rel) is not None:  # only names Load Tokens will open
                    out.append(rel)
        if len(out) >= MAX_FILES:
            break
    return sorted(out, key=str.lower)


def plain_relative(name) -> list[str] | None:
    """The parts of ``name`` if it is a plain relative path (``a/b.safetensors``, ``a\\b``) that stays where it
    is joined, on POSIX and on Windows alike; None for anything else: not a string, empty, a NUL, absolute
    (``/x``, ``\\x``, ``C:\\x``), drive-relative (``D:x``, which Windows resolves against drive D's current
    folder), UNC, or with a ``..`` part."""
    import ntpath

    if not isinstance(name, str) or not name or "\0" in name:
        return None
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        return None
    parts = name.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts) or any(":" in p for p in parts):
        return None  # ':' names an NTFS stream or a drive on Windows
    return parts


def safe_join(base: str, rel) -> str | None:
    """``base/rel`` if ``rel`` is a plain relative path (:func:`plain_relative`) that stays inside ``base``, else
    None (never an exception: the value may come from any workflow)."""
    parts = plain_relative(rel)
    if parts is None:
        return None
    base = os.path.abspath(base)
    p = os.path.abspath(os.path.join(base, *parts))
    try:
        if os.path.commonpath([base, p]) != base:
            return None
    except ValueError:  # Windows: paths on different drives
        return None
    return p
