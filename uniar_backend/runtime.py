"""Where and how UniAR computes, decided in one place for the AR model, the image decoder and the ComfyUI nodes:
the device, the dtype, the attention backend and the CPU thread policy of the decode loop.  (Inside ComfyUI the
nodes take the device and the ``auto`` dtype from ComfyUI's model management and pass them here.)"""

from __future__ import annotations

import torch

from .errors import InputError
from .limits import ATTENTION_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device not in DEVICE_CHOICES and not str(device).startswith(("cuda:", "mps:")):
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device mps was asked for but MPS is not available; use --device cpu or auto")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    return DTYPES[dtype]


def flash_attn_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the attention backend: ``auto`` uses flash-attn 2 when importable on CUDA in half precision, else sdpa."""
    if attention not in ATTENTION_CHOICES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    if attention == "auto":
        return "flash_attention_2" if (device.type == "cuda" and half and flash_attn_available()) else "sdpa"
    if attention == "flash_attention_2":
        if device.type != "cuda" or not flash_attn_available():
            raise InputError("attention=flash_attention_2 needs CUDA and the flash-attn package; use auto or sdpa")
        if not half:
            raise InputError("flash_attention_2 runs in float16/bfloat16 only; choose dtype bfloat16 or use sdpa")
    return attention


# The CPU decode loop: intra-op threads.  "auto" runs the loop single-threaded when one step reads less than
# CPU_SMALL_STEP_BYTES of weights: each op of a single-position step is then a few microseconds of work, OpenMP
# fork/join costs as much, and on a machine whose cores are shared (or busy) a parallel region waits for a
# descheduled thread (measured: 7x slower on a loaded 2-core machine; on an idle one, 2 threads gave no gain for
# these matrix-vector products).  An int forces that count; None keeps the caller's setting.
CPU_SMALL_STEP_BYTES = 256 << 20


def loop_threads(device: torch.device, step_bytes: int, setting="auto") -> int | None:
    """Threads for a decode loop on ``device`` whose step reads ``step_bytes`` of weights (None: leave as is)."""
    if device.type != "cpu" or setting is None:
        return None
    if setting == "auto":
        return 1 if step_bytes < CPU_SMALL_STEP_BYTES else None
    return max(1, int(setting))
