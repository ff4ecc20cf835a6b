"""Image preprocessing exactly as the reference pipeline does it, without torchvision.

* :func:`processor_patches` -- the Qwen3-VL fast image processor (``Qwen2VLImageProcessorFast``): RGB,
  ``smart_resize`` to multiples of 32 within ``size.shortest_edge`` .. ``size.longest_edge`` pixels, bicubic
  antialiased resize on uint8 (float interpolation, clamp, round), fused rescale/normalise, temporal repeat and
  patches in 2x2-merge-window order.
* :func:`prepare_edit_image` -- what the reference batch script does to an edit input before the processor:
  PIL ``resize((W, H))`` (bicubic), then qwen-vl-utils ``fetch_image`` (bicubic resize to multiples of 28 within
  4*28^2 .. 16384*28^2 pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

MAX_RATIO = 200


@dataclass
class ProcessorConfig:
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_file(cls, path: str) -> "ProcessorConfig":
        from .config import read_json

        d = read_json(path)
        size = d.get("size") or {}
        min_px = d.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels
        max_px = d.get("max_pixels") or size.get("longest_edge") or cls.max_pixels
        if d.get("resample", 3) != 3:
            raise InputError(f"{path}: only bicubic resampling (3) is supported, got {d.get('resample')}")
        return cls(
            patch_size=int(d.get("patch_size", 16)),
            merge_size=int(d.get("merge_size", 2)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            min_pixels=int(min_px),
            max_pixels=int(max_px),
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize`` (Python ``round``: half to even)."""
    if min(height, width) <= 0:
        raise InputError(f"image has an empty side ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is above {MAX_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qwen_utils_smart_resize(height, width, factor, min_pixels, max_pixels):
    """qwen-vl-utils 0.0.14 ``smart_resize`` (differs in where ``max(factor, .)`` is applied)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is above {MAX_RATIO}:1")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """PIL image -> RGB like transformers' ``convert_to_rgb`` (transparency composited on white)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(image):
    """16- and 32-bit integer images (16-bit PNG / TIFF open as mode I;16* or I) scaled to 8 bits; PIL's own
    conversion clips them (everything above 255 turns white)."""
    from PIL import Image

    if not (image.mode == "I" or image.mode.startswith("I;16")):
        return image
    arr = np.asarray(image).astype(np.float64)
    arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def load_image(path: str):
    """Open an image file as RGB PIL, with a clear error for missing or unreadable files."""
    from PIL import Image, UnidentifiedImageError

    from .fileio import check_input_file

    check_input_file(path, "image file")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(_to_8bit(im))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(image, Image.Image)


def image_to_uint8(image) -> torch.Tensor:
    """PIL image, uint8 HWC array/tensor, or float [H, W, 3] tensor in 0..1 (ComfyUI) -> uint8 (3, H, W)."""
    if _is_pil(image):
        arr = np.asarray(to_rgb(image), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    t = torch.as_tensor(image)
    if t.dim() != 3 or t.shape[-1] not in (3, 4):
        raise InputError(f"expected an image of shape [H, W, 3], got {list(t.shape)}")
    if t.shape[-1] == 4:
        t = t[..., :3]
    if t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return t.permute(2, 0, 1).contiguous()


def resize_uint8_bicubic(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision ``resize(uint8, BICUBIC, antialias=True)`` on the CPU: torch's native uint8 antialiased bicubic
    kernel (what torchvision >= 0.17 uses on the CPU; the float path differs by up to 16 levels)."""
    if img.shape[-2:] == (height, width):
        return img
    x = img.cpu().unsqueeze(0)
    try:
        y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    except (RuntimeError, NotImplementedError):  # very old torch without the uint8 kernel: torchvision's fallback
        y = F.interpolate(x.to(torch.float32), size=(height, width), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0, 255).round_().to(torch.uint8)
    return y.squeeze(0)


def processor_patches(image, cfg: ProcessorConfig):
    """-> (pixel_values (num_patches, C*T*P*P) float32, grid_thw (t, h, w), resized (H, W))."""
    img = image_to_uint8(image)
    h, w = img.shape[-2:]
    rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    img = resize_uint8_bicubic(img, rh, rw)
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = (img.to(torch.float32) - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    x = x.unsqueeze(0).repeat(tp, 1, 1, 1)  # (T, C, H, W)
    gh, gw = rh // p, rw // p
    x = x.view(1, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, wh, ww, mh, mw, C, T, P, P
    pixel_values = x.reshape(gh * gw, 3 * tp * p * p)
    return pixel_values, (1, gh, gw), (rh, rw)


def prepare_edit_image(image, ar_height: int, ar_width: int):
    """Edit input as the reference batch script prepares it: RGB, PIL resize to (W, H) (bicubic), then the
    qwen-vl-utils ``fetch_image`` resize to multiples of 28.  Returns a PIL image."""
    from PIL import Image

    if not _is_pil(image):
        arr = image_to_uint8(image).permute(1, 2, 0).numpy()
        image = Image.fromarray(arr, "RGB")
    image = to_rgb(image).resize((ar_width, ar_height), Image.BICUBIC)
    factor = 28
    w, h = image.size
    rh, rw = _qwen_utils_smart_resize(h, w, factor, 4 * factor**2, 16384 * factor**2)
    return image.resize((rw, rh), Image.BICUBIC)
