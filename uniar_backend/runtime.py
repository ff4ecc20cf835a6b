"""Where and how UniAR computes, decided in one place for the AR model, the image decoder and the ComfyUI nodes:
the device, the dtype, the attention backend and the CPU policies of the decode loops (threads, cache warming).
(Inside ComfyUI the nodes take the device and the ``auto`` dtype from ComfyUI's model management and pass them
here.)"""

from __future__ import annotations

import statistics
import time

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


# The CPU decode loop: cache warming.  A single-position step multiplies a few rows by each weight.  MKL's kernel for
# such products reads a weight that is not in the cache far below the memory bandwidth (measured on an AMD EPYC with
# MKL 2024.2, float32, 256..768-wide weights: 5.5 GB/s from memory, 17-27 GB/s from the cache, while a plain
# reduction streams at 23 GB/s).  Reading the weight once with a reduction right before its product brings it into
# the cache, and the pair is faster than the product alone (a 64 MB step: 10-11 ms -> 6.5-7.5 ms).  The product is
# the same call on the same data, so results are bitwise unchanged.  Only weights up to CPU_WARM_MAX_BYTES are warmed
# (a larger one would not stay in the cache); whether warming pays depends on the CPU and its BLAS, so "auto" lets
# the loop time its own steps both ways and keep the faster.
CPU_WARM_MAX_BYTES = 4 << 20
WARM_TRIAL_STEPS = 4  # timed steps each way


class WeightWarming:
    """The warming switch of one decode loop, shared by its layer calls.

    ``setting``: ``"auto"`` (time steps 1 .. 2 * WARM_TRIAL_STEPS alternately without and with warming, then keep the
    faster by median), True (always) or False / None (never).  Only CPU loops warm.  The loop calls :meth:`begin`
    before and :meth:`end` after each step; the layer calls read :attr:`on`."""

    def __init__(self, device: torch.device, setting="auto"):
        if setting not in ("auto", True, False, None):
            raise InputError(f"cpu_warm must be 'auto', True or False, got {setting!r}")
        self.active = device.type == "cpu" and setting not in (False, None)
        self.auto = self.active and setting == "auto"
        self.on = self.active and setting is True
        self.times = ([], [])  # step seconds without / with warming (auto)
        self._step = 0
        self._t0 = None

    def covers(self, weight: torch.Tensor) -> bool:
        """Whether a layer call with this weight warms it."""
        return (self.active and weight.device.type == "cpu"
                and weight.numel() * weight.element_size() <= CPU_WARM_MAX_BYTES)

    def begin(self) -> None:
        if self.auto and 1 <= self._step <= 2 * WARM_TRIAL_STEPS:  # step 0 (first use of the buffers) is not timed
            self.on = self._step % 2 == 0
            self._t0 = time.perf_counter()

    def end(self) -> None:
        if self._t0 is not None:
            self.times[self.on].append(time.perf_counter() - self._t0)
            self._t0 = None
            if self._step == 2 * WARM_TRIAL_STEPS:
                self.on = statistics.median(self.times[1]) < statistics.median(self.times[0])
        self._step += 1
