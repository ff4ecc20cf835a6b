"""Small shims over ``comfy_api.latest.io`` so the pack works across ComfyUI versions."""

from __future__ import annotations

import inspect

from comfy_api.latest import io

# the two socket types of the pack
UniARModel = io.Custom("UNIAR_MODEL")
UniARTokens = io.Custom("UNIAR_TOKENS")
TOKENS_IN_TIP = "UniAR visual tokens (from Generate, Encode Image or Load Tokens)."  # a tokens input's tooltip


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def advanced(input_cls, *args, **kwargs):
    """Build ``input_cls(*args, **kwargs)`` flagged ``advanced=True`` (an expert knob, folded away by the
    frontend) where this ComfyUI supports the flag; older releases get the plain input."""
    if _accepts(input_cls.__init__, "advanced"):
        kwargs["advanced"] = True
    return input_cls(*args, **kwargs)


def upsampling_ratio_input():
    """The ``upsampling_ratio`` input of the nodes that size a decode (UniAR Decode, UniAR Empty Latent)."""
    return io.Float.Input("upsampling_ratio", default=1.0, min=1.0, max=2.0, step=0.25,
                          tooltip=("Output size = token image size x this ratio, 1..2 (e.g. 512x512 tokens at "
                                   "2.0 give a 1024x1024 image, through the decoder's super-resolution path); "
                                   "both output sides must come out as multiples of 16."))
