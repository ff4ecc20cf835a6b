"""Token files in ComfyUI's input folder: listing and safe paths.  No ComfyUI import."""

from __future__ import annotations

import os

TOKEN_EXT = ".safetensors"


def list_token_files(input_dir: str) -> list[str]:
    """``.safetensors`` files in ComfyUI's input folder and its sub-folders (relative paths with ``/``)."""
    out = []
    if not os.path.isdir(input_dir):
        return out
    for dirpath, dirnames, filenames in os.walk(input_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.lower().endswith(TOKEN_EXT) and not f.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, f), input_dir)
                out.append(rel.replace(os.sep, "/"))
        if len(out) > 10000:
            break
    return sorted(out, key=str.lower)


def safe_join(base: str, rel: str) -> str | None:
    """``base/rel`` if it stays inside ``base``, else None."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return None
    base = os.path.abspath(base)
    p = os.path.abspath(os.path.join(base, *rel.replace("\\", "/").split("/")))
    if os.path.commonpath([base, p]) != base:
        return None
    return p
