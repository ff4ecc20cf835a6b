"""The quantised Linear layer and which layers of a model become one.

:class:`QuantLinear` keeps the format's tensors as parameters (so any host moves them like other weights) and
computes ``F.linear`` on the weight dequantised on the fly.  Its weights may sit on another device than its input
(a host streaming weights: ComfyUI's low-VRAM mode): they are then copied for the call, in their small stored
form.  It offers the samplers' lean path its call directly (:meth:`QuantLinear.uniar_linear`), so quantised
models take the fast single-position step like plain ones (no module call per layer)."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .formats import Format, get

# The Linear layers each model quantises (module names, as in the checkpoint): the LLM's decoder layers and the
# generation head's visual_decoder stack (AR model), the transformer blocks (DiT).  Everything else -- embeddings,
# norms, lm_head, output_layer_vistok, the vision tower, the BSQ projections -- keeps the compute dtype.
AR_TARGETS = re.compile(r"^(model\.language_model\.layers|visual_decoder)\.\d+\.(self_attn|mlp)\.[a-z]+_proj$")
DIT_TARGETS = re.compile(r"^transformer_blocks\.\d+\..+")


class QuantLinear(nn.Module):
    """A Linear layer with weights in ``fmt`` (bias, if any, in ``dtype``).

    ``comfy_cast_weights`` tells ComfyUI's model patcher that the layer can run with its weights left on the
    offload device (low-VRAM streaming); the layer copies them per call in any case where they are elsewhere."""

    comfy_cast_weights = False

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: Format | str, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.fmt = get(fmt) if isinstance(fmt, str) else fmt
        self.in_features, self.out_features = in_features, out_features
        layout = self.fmt.layout(out_features, in_features)
        self.names = tuple(layout)
        for name, (shape, dt) in layout.items():
            p = nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)
            p.uniar_stored = True  # the loader keeps its dtype (uniar_backend.checkpoint)
            p.uniar_finite = name != "weight"  # scales and zero points: the loader refuses NaN / inf in them
            self.register_parameter(name, p)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt.name}")

    def _tensors(self, device):
        t = {n: getattr(self, n) for n in self.names}
        if t["weight"].device != device:  # streamed: copy the stored (small) form for this call
            t = {n: v.to(device, non_blocking=True) for n, v in t.items()}
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and (b.device != x.device or b.dtype != x.dtype):
            b = b.to(x.device, x.dtype)
        return self.fmt.linear(x, self._tensors(x.device), b)

    def uniar_linear(self):
        """The layer's call for the samplers' lean path (:func:`uniar_backend.sampling.image.linear_call`)."""
        return self.forward

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.fmt.dequantize(self._tensors(self.weight.device), dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() must not turn the stored codes or scales into the compute dtype (fp8 codes
        # are floating point to torch): keep every tensor's dtype, apply only the device part of ``fn``.
        stored = {n: getattr(self, n).data for n in self.names}  # .data: the tensors, not the (mutated) Parameters
        super()._apply(fn, recurse)
        for n, old in stored.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                setattr(self, n, nn.Parameter(old.to(new.device), requires_grad=False))
        return self


def targets(model: nn.Module, pattern: re.Pattern, fmt: Format) -> list[str]:
    """Names of the Linear layers of ``model`` that ``fmt`` quantises (by ``pattern`` and the format's shapes)."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and pattern.match(name) and fmt.fits(mod.out_features, mod.in_features)]


def _replace(model: nn.Module, pattern: re.Pattern, fmt: Format, make, like: nn.Module | None = None) -> list[str]:
    """Replace the target Linears of ``model`` by ``make(layer of like)`` (``like``: a model with the same layer
    names whose layers show their shapes and biases; default ``model`` itself)."""
    like = like if like is not None else model
    names = targets(like, pattern, fmt)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(like.get_submodule(name)))
    return names


def quantize_modules(model: nn.Module, pattern: re.Pattern, fmt: Format, dtype: torch.dtype,
                     like: nn.Module | None = None) -> list[str]:
    """Replace the target Linear layers of ``model`` (built on the meta device) by empty :class:`QuantLinear`
    layers; returns their names (what the loader then reads).  ``like``: the plain-torch twin of ``model`` when
    its layers create their weights lazily (:func:`uniar_backend.checkpoint.build_on_meta`)."""
    return _replace(model, pattern, fmt, lambda ref: QuantLinear(ref.in_features, ref.out_features,
                                                                 ref.bias is not None, fmt, dtype, device="meta"),
                    like)


@torch.no_grad()
def quantize_loaded(model: nn.Module, pattern: re.Pattern, fmt: Format | str) -> list[str]:
    """Quantise the target Linears of an already loaded float model in place (benchmarks, error tables); the
    loader's path for checkpoints is :func:`quantize_modules` + :mod:`uniar_backend.quant.files`."""
    fmt = get(fmt) if isinstance(fmt, str) else fmt

    def make(old):
        w = old.weight
        new = QuantLinear(old.in_features, old.out_features, old.bias is not None, fmt, w.dtype, device=w.device)
        for k, v in fmt.quantize(w).items():
            getattr(new, k).data = v.to(w.device)
        if old.bias is not None:
            new.bias.data = old.bias.data
        return new

    return _replace(model, pattern, fmt, make)
