"""Value ranges, option names and argument checks shared by the library, the CLI and the ComfyUI nodes.

Torch-free (importing it costs nothing), so the nodes' ``validate_inputs`` can use the very checks the library
runs before any heavy work."""

from __future__ import annotations

import math

from .errors import InputError

TOKEN_PIXELS = 32  # patch 16 x spatial merge 2: one merged visual token covers 32x32 pixels
MAX_SIDE = 4096  # pixels per side of an AR image (16384 merged tokens at 4096x4096)
MAX_SEED = 2**64 - 1
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # what a decoded image's suffix writes
MAX_TOKEN_BATCH = 256  # token rows in one tokens value / file (Generate makes at most 64 at a time)
MAX_LEVELS = 16  # code levels of a token (UniAR: 4 = final layer + 3 DeepStack)
MAX_MERGE_UNIT = 16  # sub-patches of a merged token (UniAR: 4 = 2x2)
# One generation holds a KV cache of rows x positions (rows = batch, doubled with cfg > 1; positions = prompt +
# edit image + generated tokens): 160 KiB per row-position for the real model in bfloat16 (36 + 4 layers, 8 KV
# heads of 128).  This cap bounds it at 20 GiB; a 4096x4096 image with cfg (2 x ~16.5 K) or a batch of 32 at 1024x1024
# fits, 64 at 4096x4096 does not.
MAX_ROW_POSITIONS = 1 << 17

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_side(name: str, v) -> None:
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {v!r}")
    if v < TOKEN_PIXELS or v % TOKEN_PIXELS:
        raise InputError(f"{name}={v} must be a positive multiple of {TOKEN_PIXELS} (e.g. "
                         f"{max(TOKEN_PIXELS, round(v / TOKEN_PIXELS) * TOKEN_PIXELS)})")
    if v > MAX_SIDE:
        raise InputError(f"{name}={v} is too large: at most {MAX_SIDE} pixels per side "
                         f"({(MAX_SIDE // TOKEN_PIXELS) ** 2} AR steps)")


def check_size(height, width) -> None:
    check_side("height", height)
    check_side("width", width)


def check_seed(seed) -> None:
    if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise InputError(f"seed must be an integer in 0..2**64-1, got {seed!r}")


def seed_list(seed, count: int | None = None, what: str = "item(s)") -> list[int] | None:
    """A seed as the samplers and the decoder take it: one seed (checked; returns None) or a list of one per item
    (each checked, and ``count`` long when given; returned as a list)."""
    if not isinstance(seed, (list, tuple)):
        check_seed(seed)
        return None
    seeds = list(seed)
    if not seeds or (count is not None and len(seeds) != count):
        raise InputError(f"{len(seeds)} seeds for {count if count is not None else 'the'} {what}; give one seed, or "
                         "one per item")
    for s in seeds:
        check_seed(s)
    return seeds


def check_sampling(cfg, temperature, seed) -> None:
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and 0 <= cfg <= 100):
        raise InputError(f"cfg must be a number in 0..100, got {cfg!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and 0 < temperature <= 100):
        raise InputError(f"temperature must be in (0, 100], got {temperature!r}")
    seed_list(seed)


def check_generation(batch: int, height: int, width: int, cfg: float, edit_side: tuple[int, int] | None = None,
                     prompt_tokens: int = 0) -> None:
    """The KV cache a generation will hold, from its sizes alone (before any model work)."""
    rows = batch * (2 if cfg > 1 else 1)
    n = (height // TOKEN_PIXELS) * (width // TOKEN_PIXELS)
    edit = (edit_side[0] // TOKEN_PIXELS) * (edit_side[1] // TOKEN_PIXELS) if edit_side else 0
    need = rows * (prompt_tokens + edit + n)
    if need > MAX_ROW_POSITIONS:
        raise InputError(f"this generation needs {rows} rows x {prompt_tokens + edit + n} positions = {need} cached "
                         f"positions, more than the {MAX_ROW_POSITIONS} allowed (about 20 GiB of cache for the real "
                         "model); lower batch_size or the size")
