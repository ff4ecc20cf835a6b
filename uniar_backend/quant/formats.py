"""The three weight formats: their tensors, quantisation and the matrix product on them (plain torch, CPU and
CUDA; the weight is dequantised on the fly in the compute dtype).  Layouts: see :mod:`uniar_backend.quant`."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from . import COMFY_FORMATS, INT4_GROUP


ROWS = 512  # quantise this many output rows at a time: float32 temporaries stay small for any layer size


def _by_rows(w: torch.Tensor, fn) -> dict[str, torch.Tensor]:
    """``fn`` on blocks of rows of ``w``, the results concatenated along ``dim`` of each (0: rows, 1: columns)."""
    parts = [fn(w[r:r + ROWS]) for r in range(0, w.shape[0], ROWS)]
    return {k: torch.cat([p[k][0] for p in parts], dim=parts[0][k][1]) for k in parts[0]}


class Format:
    name = ""
    storage = torch.int8

    @property
    def comfy_name(self) -> str:
        return COMFY_FORMATS[self.name]

    def comfy_quant(self) -> dict:
        """The JSON of ``<p>.comfy_quant``."""
        return {"format": self.comfy_name}

    def fits(self, out_features: int, in_features: int) -> bool:
        """Whether a Linear of this shape can be stored in the format (else it stays in the compute dtype)."""
        return True

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[tuple, torch.dtype]]:
        """``{suffix: (shape, dtype)}`` of a quantised weight (suffix "weight", "weight_scale", ...)."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float weight [N, K] -> its tensors (computed in float32, a block of rows at a time)."""
        raise NotImplementedError

    def dequantize(self, t: dict, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, t: dict, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantize(t, x.dtype), bias)


class Int8(Format):
    """Symmetric int8 with one float32 scale per output channel (ComfyUI ``int8_tensorwise``, per-row scale)."""

    name = "int8"
    storage = torch.int8

    def layout(self, n, k):
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n, 1), torch.float32)}

    def quantize(self, w):
        def block(b):
            wf = b.float()
            scale = (wf.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
            return {"weight": ((wf / scale).round_().clamp_(-127, 127).to(torch.int8), 0),
                    "weight_scale": (scale, 0)}

        return _by_rows(w, block)

    def dequantize(self, t, dtype):
        return (t["weight"].float() * t["weight_scale"]).to(dtype)

    def linear(self, x, t, bias):
        # the per-row scale commutes with the product: scale the N outputs instead of the N x K weight
        y = F.linear(x, t["weight"].to(x.dtype)) * t["weight_scale"].view(-1).to(x.dtype)
        return y + bias if bias is not None else y


class Fp8(Format):
    """float8_e4m3fn with one float32 scale per tensor (ComfyUI ``float8_e4m3fn``, the scaled-fp8 layout)."""

    name = "fp8"
    storage = getattr(torch, "float8_e4m3fn", None)

    def layout(self, n, k):
        return {"weight": ((n, k), self.storage), "weight_scale": ((), torch.float32)}

    def quantize(self, w):
        scale = (w.abs().amax().float() / 448.0).clamp(min=1e-12)
        q = _by_rows(w, lambda b: {"weight": ((b.float() / scale).clamp_(-448.0, 448.0).to(self.storage), 0)})
        return {"weight": q["weight"], "weight_scale": scale}

    def dequantize(self, t, dtype):
        return (t["weight"].float() * t["weight_scale"]).to(dtype)

    def linear(self, x, t, bias):
        y = F.linear(x, t["weight"].to(x.dtype)) * t["weight_scale"].to(x.dtype)
        return y + bias if bias is not None else y


class Int4(Format):
    """Asymmetric 4-bit in groups of 64 along K, packed two per byte (ComfyUI / comfy-kitchen ``awq_w4a16``):
    ``W[n, k] = (q[n, k] - 8) * scale[k // 64, n] + zeros[k // 64, n]``, q unsigned in 0..15, the even column in
    the low nibble; scales and zero points in bfloat16."""

    name = "int4"
    storage = torch.int8
    group = INT4_GROUP
    side = torch.bfloat16

    def comfy_quant(self):
        return {"format": self.comfy_name, "group_size": self.group}

    def fits(self, n, k):
        return k % self.group == 0

    def layout(self, n, k):
        g = k // self.group
        return {"weight": ((n, k // 2), torch.int8), "weight_scale": ((g, n), self.side),
                "weight_zeros": ((g, n), self.side)}

    def quantize(self, w):
        return _by_rows(w, self._block)

    def _block(self, w):
        n, k = w.shape
        wg = w.float().view(n, k // self.group, self.group)
        lo, hi = wg.amin(dim=2, keepdim=True), wg.amax(dim=2, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(self.side).float()  # the stored (rounded) scale
        q = torch.round((wg - lo) / scale).clamp_(0, 15)
        zeros = lo + 8.0 * scale  # W = q * scale + lo = (q - 8) * scale + zeros
        # choose the zero point that fits the rounded q best: the mean residual of each group
        zeros = zeros + (wg - ((q - 8.0) * scale + zeros)).mean(dim=2, keepdim=True)
        q = q.to(torch.uint8).view(n, k)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).view(torch.int8)
        return {"weight": (packed.contiguous(), 0), "weight_scale": (scale[..., 0].t().to(self.side).contiguous(), 1),
                "weight_zeros": (zeros[..., 0].t().to(self.side).contiguous(), 1)}

    def dequantize(self, t, dtype):
        packed = t["weight"].view(torch.uint8)
        n, half = packed.shape
        q = torch.stack((packed & 15, packed >> 4), dim=-1).view(n, half * 2 // self.group, self.group)
        scale = t["weight_scale"].t().to(dtype).unsqueeze(-1)
        zeros = t["weight_zeros"].t().to(dtype).unsqueeze(-1)
        return ((q.to(dtype) - 8) * scale + zeros).view(n, half * 2)


REGISTRY: dict[str, Format] = {f.name: f for f in (Int8(), Fp8(), Int4())}
BY_COMFY_NAME = {f.comfy_name: f for f in REGISTRY.values()}


def get(name: str) -> Format:
    from . import check_format

    return REGISTRY[check_format(name)]


def check_device(fmt: Format, device: torch.device) -> None:
    """A format the device cannot run is refused before anything loads."""
    if fmt.storage is None:
        raise InputError(f"weights {fmt.name} need torch.float8_e4m3fn, which this torch ({torch.__version__}) lacks; "
                         "use int8 or int4, or a newer torch")
    if fmt.name == "fp8" and device.type == "mps":
        raise InputError("weights fp8 cannot run on MPS (no float8 there); use int8 or int4")


def comfy_quant_tensor(fmt: Format) -> torch.Tensor:
    return torch.tensor(list(json.dumps(fmt.comfy_quant()).encode("utf-8")), dtype=torch.uint8)


# ComfyUI's markers are a few dozen bytes ({"format": "int8_tensorwise"}); anything past this is no marker.
MAX_COMFY_QUANT = 4096


def check_comfy_quant_layout(shape, dtype, where: str) -> None:
    """A ``comfy_quant`` marker is a short 1-D uint8 tensor (checked from the header, before it is read)."""
    if dtype != torch.uint8 or len(shape) != 1 or not 0 < shape[0] <= MAX_COMFY_QUANT:
        raise CheckpointError(f"{where}: comfy_quant is {dtype} {list(shape)}, not the 1-D uint8 JSON marker of at "
                              f"most {MAX_COMFY_QUANT} bytes ComfyUI writes; the file is damaged")


def read_comfy_quant(t: torch.Tensor, where: str) -> dict:
    from ..jsonfile import parse_json

    check_comfy_quant_layout(tuple(t.shape), t.dtype, where)
    return parse_json(t.numpy().tobytes(), f"{where}: comfy_quant", "the file is damaged",
                      max_bytes=MAX_COMFY_QUANT, want=dict)
