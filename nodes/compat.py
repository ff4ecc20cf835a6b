"""Small shims over ``comfy_api.latest.io`` so the pack works across ComfyUI versions."""

from __future__ import annotations

import inspect

from comfy_api.latest import io

# the two socket types of the pack
UniARModel = io.Custom("UNIAR_MODEL")
UniARTokens = io.Custom("UNIAR_TOKENS")


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
