"""Checkpoint folders in ComfyUI's model folders: discovery, lookup, where a download goes, completeness.
No ComfyUI import (tested without ComfyUI)."""

from __future__ import annotations

import os

from ..uniar_backend import limits
from ..uniar_backend.fileio import PARTIAL
from .token_files import plain_relative, safe_join

HUB_REPOS = ("ShareLab-SII/UniAR-SFT", "ShareLab-SII/UniAR-RL")
DTYPES = limits.DTYPE_CHOICES
ATTENTIONS = limits.ATTENTION_CHOICES


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def list_checkpoints(folders) -> list[str]:
    """Checkpoint folders (HF layout: a folder holding ``config.json``) found in the given model folders.

    A checkpoint directly inside a model folder is listed by its folder name (``UniAR-SFT``); one level deeper
    (``ShareLab-SII/UniAR-SFT``) by its relative path with ``/``.  Symlinks are followed; hidden folders and the
    Hub download cache (``.cache``) are skipped."""
    names = set()
    for root in folders:
        if not os.path.isdir(root):
            continue
        try:
            children = sorted(os.listdir(root))
        except OSError:
            continue
        for child in children:
            if child.startswith(".") or PARTIAL in child:  # hidden, or a conversion still being written
                continue
            p = os.path.join(root, child)
            if not os.path.isdir(p):
                continue
            if _is_checkpoint_dir(p):
                names.add(child)
                continue
            try:
                grandchildren = sorted(os.listdir(p))
            except OSError:
                continue
            for g in grandchildren:
                q = os.path.join(p, g)
                if not g.startswith(".") and os.path.isdir(q) and _is_checkpoint_dir(q):
                    names.add(f"{child}/{g}")
    return sorted(names, key=str.lower)


def find_checkpoint(name: str, folders) -> str | None:
    """Full path of the checkpoint folder ``name`` (as listed by :func:`list_checkpoints`), or None."""
    parts = plain_relative(name)
    if parts is None:
        return None
    for root in folders:
        p = os.path.join(root, *parts)
        if os.path.isdir(p) and _is_checkpoint_dir(p):
            return p
    return None


def hub_local_dir(repo_id: str, folders) -> str:
    """Where the download node puts ``repo_id``: ``<first uniar folder>/<repo name>`` (e.g. models/uniar/UniAR-SFT)."""
    if not folders:
        raise ValueError("no 'uniar' model folder is registered")
    return os.path.join(folders[0], repo_id.split("/")[-1])


def checkpoint_looks_complete(path: str) -> bool:
    """True when ``path`` holds a full UniAR checkpoint (config, every weight shard of the index, BSQ encoder,
    SD3 decoder parts), so the download node can skip the Hub (and works offline)."""
    from ..uniar_backend.errors import UniARError
    from ..uniar_backend.jsonfile import read_json_file

    if not _is_checkpoint_dir(path):
        return False
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            weight_map = read_json_file(index).get("weight_map")
        except UniARError:
            return False  # damaged: not complete (the download fetches it again)
        if not isinstance(weight_map, dict):
            return False
        shards = [safe_join(path, s) for s in weight_map.values()]  # None: not a file name inside the folder
        if not shards or not all(s is not None and os.path.isfile(s) for s in shards):
            return False
    elif not os.path.isfile(os.path.join(path, "model.safetensors")):
        return False
    for sub in ("bsq_encoder", "sd3_transformer", "sd3_pipeline"):
        if not os.path.isdir(os.path.join(path, sub)):
            return False
    return True
