"""ComfyUI IMAGE values for the backend.  No ComfyUI import."""

from __future__ import annotations


def rgb_list(image) -> list:
    """ComfyUI IMAGE [B, H, W, C] -> list of [H, W, 3] float tensors on the CPU."""
    from ..uniar_backend.errors import InputError

    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[-1] < 3:
        raise InputError(f"expected an IMAGE [batch, height, width, channels], got shape {list(image.shape)}")
    return [image[i, ..., :3].float().cpu() for i in range(image.shape[0])]
