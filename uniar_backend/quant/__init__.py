"""Low-VRAM weights: 8-bit and 4-bit Linear layers, stored in safetensors in core ComfyUI's key layout.

==========  =========================  ======================================================================
format      ComfyUI ``comfy_quant``     tensors per quantised Linear ``<p>`` (dequantised weight ``W``)
==========  =========================  ======================================================================
``int8``    ``int8_tensorwise``         ``<p>.weight`` int8 [N, K]; ``<p>.weight_scale`` float32 [N, 1]
                                        (per output channel, symmetric): ``W = q * scale``
``fp8``     ``float8_e4m3fn``           ``<p>.weight`` float8_e4m3fn [N, K]; ``<p>.weight_scale`` float32 []
                                        (per tensor, ComfyUI's scaled fp8): ``W = q * scale``
``int4``    ``awq_w4a16``               ``<p>.weight`` int8 [N, K/2], two unsigned 4-bit values per byte (low
                                        nibble = column 2j); ``<p>.weight_scale`` / ``<p>.weight_zeros``
                                        bfloat16 [K/64, N] (groups of 64 along K, asymmetric):
                                        ``W = (q - 8) * scale + zeros``
==========  =========================  ======================================================================

Every quantised layer also carries ``<p>.comfy_quant``: a uint8 tensor holding the JSON ``{"format": ...}``, as
ComfyUI's ``mixed_precision_ops`` writes and reads it.  Which layers are quantised is fixed by the format and the
model's config (:func:`uniar_backend.quant.layers.targets`): the Linear layers of the LLM's decoder layers, of the
generation head's ``visual_decoder`` stack and of the DiT's transformer blocks; embeddings, norms, ``lm_head``,
the vistok output layer, the vision tower, the BSQ projections and the VAE stay in the compute dtype.

This module imports no torch (the CLI and the node schemas read the names for free).
"""

from __future__ import annotations

FORMATS = ("int8", "fp8", "int4")
COMFY_FORMATS = {"int8": "int8_tensorwise", "fp8": "float8_e4m3fn", "int4": "awq_w4a16"}
INT4_GROUP = 64
CONFIG_KEY = "uniar_quantization"  # in config.json (AR) and sd3_transformer/config.json: {"format": ..., ...}


def check_format(name, what: str = "weights") -> str:
    from ..errors import InputError

    if name not in FORMATS:
        raise InputError(f"{what} format must be one of {', '.join(FORMATS)}, got {str(name)[:40]!r}")
    return name


def check_requested(stored: str | None, weights: str | None, where: str) -> None:
    """A folder stored in one format is not quantised again into another (the loader, and the loader node before
    anything loads)."""
    from ..errors import CheckpointError

    if weights is not None and stored is not None and weights != stored:
        raise CheckpointError(f"{where} is stored in {stored}; it cannot be loaded as {weights} (quantising "
                              f"twice loses precision): choose weights {stored} or 'as stored', or convert the float "
                              "checkpoint")
