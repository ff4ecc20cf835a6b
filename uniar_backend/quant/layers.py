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
        self.names = tuple(self.fmt.layout(out_features, in_features, dtype))
        for name, (shape, dt) in self.fmt.layout(out_features, in_features, dtype).items():
            p = nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)
            p.uniar_stored = True  # the loader keeps its dtype (uniar_backend.checkpoint)
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


def _linear_shape(mod) -> tuple[int, int, bool] | None:
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear) or (hasattr(mod, "in_features") and hasattr(mod, "out_features") and w is not None
                                      and getattr(w, "dim", lambda: 0)() == 2):
        return mod.in_features, mod.out_features, getattr(mod, "bias", None) is not None
    return None


def targets(model: nn.Module, pattern: re.Pattern, fmt: Format) -> list[str]:
    """Names of the Linear layers of ``model`` that ``fmt`` quantises (by ``pattern`` and the format's shapes)."""
    out = []
    for name, mod in model.named_modules():
        shape = _linear_shape(mod) if isinstance(mod, nn.Linear) else None
        if shape and pattern.match(name) and fmt.fits(shape[1], shape[0]):
            out.append(name)
    return out


def quantize_modules(model: nn.Module, pattern: re.Pattern, fmt: Format, dtype: torch.dtype, device=None) -> list[str]:
    """Replace the target Linear layers of ``model`` (built on the meta device) by empty :class:`QuantLinear`
    layers; returns their names."""
    names = targets(model, pattern, fmt)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        k, n, bias = _linear_shape(getattr(parent, child))
        setattr(parent, child, QuantLinear(k, n, bias, fmt, dtype, device=device or "meta"))
    return names


@torch.no_grad()
def quantize_loaded(model: nn.Module, pattern: re.Pattern, fmt: Format | str) -> list[str]:
    """Quantise the target Linears of an already loaded float model in place (benchmarks, error tables); the
    loader's path for checkpoints is :func:`quantize_modules` + :mod:`uniar_backend.quant.files`."""
    fmt = get(fmt) if isinstance(fmt, str) else fmt
    names = targets(model, pattern, fmt)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        dt = old.weight.dtype
        new = QuantLinear(old.in_features, old.out_features, old.bias is not None, fmt, dt, device=old.weight.device)
        for k, v in fmt.quantize(old.weight, dt).items():
            getattr(new, k).data = v.to(old.weight.device)
        if old.bias is not None:
            new.bias.data = old.bias.data
        setattr(parent, child, new)
    return names
