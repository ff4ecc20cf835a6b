"""Pure helpers of the UniAR nodes: no ComfyUI import, torch imported only inside the functions that need it.

Everything here is unit-tested without ComfyUI (tests/test_nodes.py): checkpoint discovery in model folders,
aspect-ratio presets, batch pairing of prompts and edit inputs and the bit-plane preview of visual tokens.
"""

from __future__ import annotations

import math
import os

from ..uniar_backend import limits
from ..uniar_backend.limits import MAX_SEED, MAX_SIDE, TOKEN_PIXELS  # noqa: F401  (used by the node schemas)

MIN_SIDE = TOKEN_PIXELS
MAX_BATCH = 64

HUB_REPOS = ("ShareLab-SII/UniAR-SFT", "ShareLab-SII/UniAR-RL")
DTYPES = limits.DTYPE_CHOICES
ATTENTIONS = limits.ATTENTION_CHOICES

ASPECT_CUSTOM = "custom (width x height)"
ASPECT_MATCH = "match edit input"
ASPECT_PRESETS = {
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "21:9": (21, 9),
    "9:21": (9, 21),
}
ASPECT_CHOICES = (ASPECT_CUSTOM, *ASPECT_PRESETS, ASPECT_MATCH)


# --------------------------------------------------------------------------------------------- checkpoints
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
            if child.startswith("."):
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
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return None
    for root in folders:
        p = os.path.join(root, *name.split("/"))
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
    import json

    if not _is_checkpoint_dir(path):
        return False
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = set(json.load(f).get("weight_map", {}).values())
        except (OSError, ValueError):
            return False
        if not shards or not all(os.path.isfile(os.path.join(path, s)) for s in shards):
            return False
    elif not os.path.isfile(os.path.join(path, "model.safetensors")):
        return False
    for sub in ("bsq_encoder", "sd3_transformer", "sd3_pipeline"):
        if not os.path.isdir(os.path.join(path, sub)):
            return False
    return True


# --------------------------------------------------------------------------------------------- sizes
def round_to_tokens(v: float) -> int:
    """Nearest multiple of 32 within the allowed side range."""
    return int(min(MAX_SIDE, max(MIN_SIDE, round(v / TOKEN_PIXELS) * TOKEN_PIXELS)))


def resolve_size(aspect: str, width: int, height: int, match: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) of the AR image.

    * ``custom``: ``width`` x ``height`` as given (must be multiples of 32).
    * a preset ``W:H``: that aspect ratio with about the pixel count of ``width x height``, sides rounded to 32.
    * ``match edit input``: ``match`` = (w, h) of the edit input; tokens give their exact size, an image its
      aspect ratio at about ``width x height`` pixels (sides rounded to 32).  Without an edit input, as custom.
    """
    if aspect == ASPECT_CUSTOM or (aspect == ASPECT_MATCH and match is None):
        return int(width), int(height)
    area = float(width) * float(height)
    if aspect == ASPECT_MATCH:
        mw, mh = match
        rw, rh = float(mw), float(mh)
    elif aspect in ASPECT_PRESETS:
        rw, rh = ASPECT_PRESETS[aspect]
    else:
        raise ValueError(f"unknown aspect ratio {aspect!r}; choose one of {', '.join(ASPECT_CHOICES)}")
    h = math.sqrt(area * rh / rw)
    w = area / h
    return round_to_tokens(w), round_to_tokens(h)


def pair_batch(batch_size: int, n_edit: int | None) -> int:
    """Number of prompts to generate for ``batch_size`` and an edit input holding ``n_edit`` images (None: no edit).

    One edit image is shared by the whole batch; several edit images give one output each (batch_size must then
    be 1 or equal to their number)."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH}, got {batch_size}")
    if not n_edit or n_edit == 1:
        return batch_size
    if batch_size in (1, n_edit):
        return n_edit
    raise ValueError(f"the edit input holds {n_edit} images but batch_size is {batch_size}; "
                     f"use batch_size 1 (one output per edit image) or {n_edit}")


# --------------------------------------------------------------------------------------------- tokens on disk
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


# --------------------------------------------------------------------------------------------- bit-plane preview
PREVIEW_MODES = ("tiles", "planes")
LEVEL_COLORS = ((1.0, 1.0, 1.0), (1.0, 0.55, 0.2), (0.3, 0.8, 1.0), (0.6, 1.0, 0.4),
                (1.0, 0.4, 0.8), (1.0, 1.0, 0.3))


def _tile_shape(d: int) -> tuple[int, int]:
    """A near-square (rows, cols) layout for ``d`` bits (16 -> 4x4, 64 -> 8x8, 32 -> 4x8)."""
    r = int(math.isqrt(d))
    while d % r:
        r -= 1
    return r, d // r


def bit_grid(bits, grid: tuple[int, int], merge: int = 2):
    """Bits ``[B, N, levels, merge_unit, d]`` -> per level a spatial map ``[B, levels, rows*m, cols*m, d]``
    (one cell per 16x16-pixel patch; the 2x2 sub-patches of each merged token in row-major window order)."""
    B, N, L, U, d = bits.shape
    rows, cols = grid
    if rows * cols != N:
        raise ValueError(f"token grid {rows}x{cols} does not match {N} tokens")
    if merge * merge != U:
        raise ValueError(f"merge_unit {U} is not {merge}x{merge}")
    x = bits.reshape(B, rows, cols, L, merge, merge, d)  # window (r, c), sub-patch (i, j)
    x = x.permute(0, 3, 1, 4, 2, 5, 6)  # B, L, rows, i, cols, j, d
    return x.reshape(B, L, rows * merge, cols * merge, d)


def preview_bits(bits, grid: tuple[int, int], mode: str = "tiles", level: int = -1, scale: int = 1,
                 gap: int = 2):
    """A picture of visual-token bits as an IMAGE tensor ``[B, H, W, 3]`` (float 0..1).

    * ``tiles``: every 16x16-pixel patch becomes a small tile of its ``d`` bits (4x4 for d=16, 8x8 for d=64),
      so the picture keeps the image layout; the levels (0 = final layer, 1.. = DeepStack) side by side, each
      in its own colour.
    * ``planes``: one small map per bit position (``d`` maps in a grid, one pixel per patch): bit k of every
      patch at once, which shows which bits follow the image content and which look random.

    ``level`` -1 = all levels, else one level.  ``scale``: nearest-neighbour enlargement."""
    import torch

    if mode not in PREVIEW_MODES:
        raise ValueError(f"mode must be one of {PREVIEW_MODES}, got {mode!r}")
    if scale < 1:
        raise ValueError("scale must be >= 1")
    g = bit_grid(bits, grid).float()  # B, L, R, C, d
    B, L, R, C, d = g.shape
    if level >= L:
        raise ValueError(f"level {level} does not exist: the tokens hold {L} levels (0..{L - 1})")
    levels = list(range(L)) if level < 0 else [level]
    panels = []
    for lv in levels:
        x = g[:, lv]  # B, R, C, d
        if mode == "tiles":
            tr, tc = _tile_shape(d)
            img = x.reshape(B, R, C, tr, tc).permute(0, 1, 3, 2, 4).reshape(B, R * tr, C * tc)
        else:
            pr, pc = _tile_shape(d)
            p = x.permute(0, 3, 1, 2)  # B, d, R, C
            p = torch.nn.functional.pad(p, (0, gap, 0, gap), value=0.5)  # separate the planes
            img = p.reshape(B, pr, pc, R + gap, C + gap).permute(0, 1, 3, 2, 4).reshape(
                B, pr * (R + gap), pc * (C + gap))
            img = img[:, : pr * (R + gap) - gap, : pc * (C + gap) - gap]
        color = torch.tensor(LEVEL_COLORS[lv % len(LEVEL_COLORS)])
        panels.append(img[..., None] * color)
    H = max(p.shape[1] for p in panels)
    out = []
    for i, p in enumerate(panels):
        if p.shape[1] < H:
            p = torch.nn.functional.pad(p, (0, 0, 0, 0, 0, H - p.shape[1]), value=0.0)
        out.append(p)
        if i + 1 < len(panels):
            out.append(torch.full((B, H, gap * 2, 3), 0.5))
    img = torch.cat(out, dim=2)
    if scale > 1:
        img = img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return img.clamp(0, 1).contiguous()


def drawn_preview(bits, grid: tuple[int, int], min_width: int = 256):
    """The live preview of a generation: the bits of the tokens drawn so far (one row, ``[i, levels, unit, d]``)
    as level-0 tiles in image layout, the tokens not drawn yet in grey; ``[H, W, 3]`` float, enlarged to at least
    ``min_width`` pixels."""
    import torch

    rows, cols = grid
    n = rows * cols
    full = torch.full((1, n, *bits.shape[1:]), 0.5)
    full[0, : bits.shape[0]] = bits.float().cpu()
    img = preview_bits(full, grid, mode="tiles", level=0)
    scale = max(1, -(-min_width // img.shape[2]))
    if scale > 1:
        img = img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return img[0]


def preview_every(grid: tuple[int, int], updates: int = 8) -> int:
    """Steps between live previews: whole token rows, about ``updates`` pictures per image."""
    rows, cols = grid
    return cols * max(1, rows // updates)


# --------------------------------------------------------------------------------------------- text
def join_answers(answers: list[str]) -> str:
    """One STRING for a batch of answers: the answer itself for one image, numbered paragraphs for several."""
    if len(answers) == 1:
        return answers[0]
    return "\n\n".join(f"[{i}] {a}" for i, a in enumerate(answers))
