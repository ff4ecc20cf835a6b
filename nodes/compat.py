"""The ComfyUI API the nodes use, and small shims over it so the pack works across ComfyUI versions.

The nodes import ``io``, ``ui`` and ``ComfyExtension`` from here, which takes them from the pinned API version
``comfy_api.v0_0_2`` (ComfyUI's maintainers advise a pinned version over ``comfy_api.latest``; 0.3.64, 0.28 and
0.33 all have it and it offers everything the nodes use), falling back to ``comfy_api.latest`` on a release whose
``v0_0_2`` does not re-export them."""

from __future__ import annotations

import inspect

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401  (ComfyExtension, ui: imported from here)
except ImportError:
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

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
