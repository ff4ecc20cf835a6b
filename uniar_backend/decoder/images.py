"""Writing decoded images: PNG, atomically (temporary file in the target folder, then ``os.replace``)."""

from __future__ import annotations

import os

import torch

from ..errors import InputError
from ..fileio import atomic_path
from ..limits import IMAGE_FORMATS


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, 3]`` floats in [0, 1] -> uint8, rounding as diffusers' ``numpy_to_pil`` (``round(x * 255)``)."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def output_paths(path: str | os.PathLike, count: int) -> list[str]:
    """One image: ``path`` itself; a batch: ``stem_00000.ext``, ``stem_00001.ext``, ..."""
    path = os.fspath(path)
    if count == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{i:05d}{ext or '.png'}" for i in range(count)]


FORMATS = {**IMAGE_FORMATS, "": "PNG"}  # no suffix: PNG


def save_images(images: torch.Tensor, path: str | os.PathLike, metadata: dict | None = None) -> list[str]:
    """Save ``[B, H, W, 3]`` (or ``[H, W, 3]``) images in [0, 1] in the format the suffix names (PNG, JPEG at
    quality 95, lossless WebP; no suffix: PNG); returns the written paths.

    ``metadata``: optional text chunks (e.g. the decode parameters; PNG only)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise InputError(f"{path}: unknown image suffix {ext!r}; use .png, .jpg or .webp")
    fmt = FORMATS[ext]
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise InputError(f"images must be [B, H, W, 3] with B >= 1, got {list(images.shape)}")
    pixels = to_uint8(images).numpy()
    paths = output_paths(path, pixels.shape[0])
    for arr, out in zip(pixels, paths, strict=True):
        with atomic_path(out, prefix=".uniar_img_", suffix=ext or ".png") as tmp:
            write_image(arr, tmp, fmt, metadata)
    return paths


def write_image(pixels, path: str, fmt: str = "PNG", metadata: dict | None = None) -> None:
    """One ``[H, W, 3]`` uint8 array written to ``path`` directly in ``fmt`` (PNG with ``metadata`` as text
    chunks, JPEG at quality 95, lossless WebP); :func:`save_images` wraps it in an atomic write."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if metadata and fmt == "PNG":
        info = PngInfo()
        for k, v in metadata.items():
            info.add_text(str(k), str(v))
    opts = {"PNG": {"pnginfo": info}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}}[fmt]
    Image.fromarray(pixels).save(path, format=fmt, **opts)
