"""Pictures of visual-token bits: the Preview Tokens node and Generate's live preview.  No ComfyUI import;
torch is imported inside the functions."""

from __future__ import annotations

import math

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
