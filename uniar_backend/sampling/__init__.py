"""The samplers, in one registry.

* image samplers (AR visual tokens): ``fast`` (default) and ``reference`` -- :mod:`.image`;
* text samplers (caption / VQA tokens): ``greedy`` (default) and ``sampling`` -- :mod:`.text`.

A new sampler is one module plus one entry below; the CLI's ``--mode`` choices, the Generate node's ``mode`` combo
and the benchmark read :data:`IMAGE_SAMPLERS` / :data:`TEXT_SAMPLERS`.  This file imports no torch: the samplers'
modules load when a sampler is used (so the CLI and the node schemas can read the names for free).
"""

from __future__ import annotations

import importlib
from typing import Callable

IMAGE_SAMPLERS = {"fast": ".image:sample_fast", "reference": ".image:sample_reference"}
TEXT_SAMPLERS = {"greedy": ".text:pick_greedy", "sampling": ".text:pick_sampling"}
MODES = tuple(IMAGE_SAMPLERS)  # the built-in image samplers (the benchmark compares these two)

# names importable from here, resolved on first use: ``from uniar_backend.sampling import Prefix, sample``
_LAZY = {"Prefix": ".image", "mix_and_sample": ".image", "step_weight_bytes": ".image", "generate_text": ".text"}


def _resolve(spec: str):
    """``".image:sample_fast"`` (relative to this package) or ``"package.module:function"`` -> the function."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module, __name__ if module.startswith(".") else None), attr)


def image_sampler(name: str) -> Callable:
    if name not in IMAGE_SAMPLERS:
        from ..errors import InputError

        raise InputError(f"mode must be one of {', '.join(IMAGE_SAMPLERS)}, got {name!r}")
    return _resolve(IMAGE_SAMPLERS[name])


def text_sampler(name: str) -> Callable:
    if name not in TEXT_SAMPLERS:
        from ..errors import InputError

        raise InputError(f"text sampler must be one of {', '.join(TEXT_SAMPLERS)}, got {name!r}")
    return _resolve(TEXT_SAMPLERS[name])


def sample(model, prefix, cfg: float, temperature: float, seed: int, mode: str = "fast",
           callback: Callable[[int, int], None] | None = None, logits_out: list | None = None, preview=None,
           **options):
    """Run the image sampler ``mode``; returns bits (R, N, levels, unit, d) int64 for all rows.

    ``preview``: a callable with an int attribute ``every``, called with the bits drawn so far (a view, no copy
    in the fast sampler) every ``every`` steps and after the last one (live previews).  ``seed``: one int, or a
    list of one per prompt (each prompt then draws exactly what it draws when sampled alone with that seed).
    ``options``: the sampler's own options (``fast``: ``cuda_graph``, ``cpu_threads``)."""
    import torch

    fn = image_sampler(mode)
    dev = prefix.embeds.device
    if isinstance(seed, (list, tuple)):  # one stream per prompt
        generator = [torch.Generator(device=dev).manual_seed(s) for s in seed]
    else:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed)
    with torch.inference_mode():
        return fn(model, prefix, cfg, temperature, generator, callback, logits_out, preview, **options)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
