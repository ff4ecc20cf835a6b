"""AR image sizes of the Generate node: aspect-ratio presets and the pairing of prompts with edit inputs.
No ComfyUI import (tested without ComfyUI)."""

from __future__ import annotations

import math

from ..uniar_backend.limits import MAX_SIDE, TOKEN_PIXELS  # noqa: F401  (used by the node schemas)

MIN_SIDE = TOKEN_PIXELS
MAX_BATCH = 64

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
