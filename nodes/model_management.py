"""Glue between the UniAR backend and ComfyUI's model management.

``UniARHandle`` is what travels on ``UNIAR_MODEL`` sockets: a light description (checkpoint folder, dtype,
attention).  The heavy parts are loaded on first use, only the components a node needs, and kept in a
per-process cache wrapped in ``comfy.model_patcher.ModelPatcher``:

* the AR model (``Checkpoint.load_ar``): one ``UniARModel`` per (checkpoint, dtype, attention) holding the
  union of the components asked for so far (caption: llm + lm_head (+ vision); generate: llm + gen_head
  (+ vision for edit images); encode: vision).  A node that needs a component not loaded yet reloads the model
  with the union (the old copy is dropped first); re-running a node never re-reads the files.
* the image decoder (``load_decoder``): SD3 transformer + VAE + BSQ projection in one patcher; it never loads
  the LLM, and captioning never loads it.

Weights are read onto ComfyUI's offload device and built from ``comfy.ops`` layers;
``comfy.model_management.load_models_gpu`` brings them onto the compute device before every use, so ComfyUI
can evict them when other models need the memory (and stream them in low-VRAM mode) and reload them without
touching the files.  Devices come from model management (``--cpu``, ``--lowvram``, ``--gpu-only`` respected).
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

log = logging.getLogger("UniAR")
_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------- the handle
@dataclass(frozen=True)
class UniARHandle:
    """The ``UNIAR_MODEL`` value: where the checkpoint is and how to load it.  Nothing heavy inside."""

    path: str
    dtype: str = "auto"
    attention: str = "auto"

    @property
    def name(self) -> str:
        import os

        return os.path.basename(self.path.rstrip("/\\"))

    def checkpoint(self):
        return get_checkpoint(self.path)

    def __repr__(self):
        return f"UniAR({self.name}, dtype={self.dtype}, attention={self.attention})"


_CHECKPOINTS: dict = {}


def get_checkpoint(path: str):
    """``Checkpoint`` objects are cheap but cache their tokenizer / processor config: keep one per folder."""
    from ..uniar_backend.loader import Checkpoint

    with _LOCK:
        ck = _CHECKPOINTS.get(path)
        if ck is None:
            ck = Checkpoint(path)
            _CHECKPOINTS[path] = ck
        return ck


# --------------------------------------------------------------------------------------------- devices, dtypes
def load_device() -> torch.device:
    return mm.get_torch_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: float32 on the CPU, else bfloat16 where ComfyUI says the device supports it, else float16,
    else float32 (the same choice the CLI makes on CPU and CUDA)."""
    if dtype != "auto":
        return dtype
    if mm.is_device_cpu(device):
        return "float32"
    if mm.should_use_bf16(device, prioritize_performance=False):
        return "bfloat16"
    if mm.should_use_fp16(device, prioritize_performance=False):
        return "float16"
    return "float32"


def resolve_attention(attention: str, device: torch.device, dtype: str) -> str:
    """The attention backend for the *compute* device (weights are read on the offload device)."""
    from ..uniar_backend.loader import resolve_dtype as backend_dtype
    from ..uniar_backend.modeling.layers import resolve_attention as backend_attention

    return backend_attention(attention, device, backend_dtype(dtype, device))


def comfy_ops():
    """Layers whose weights ComfyUI can stream (low-VRAM) and cast on the fly.  Weight dtype = compute dtype
    here, so ``disable_weight_init`` (the ops ComfyUI itself uses in that case) is the right set: ModelPatcher
    switches single layers to casting mode when it leaves their weights on the offload device."""
    return comfy.ops.disable_weight_init


# --------------------------------------------------------------------------------------------- patchers
class _Holder(torch.nn.Module):
    """What a ModelPatcher wraps: the backend modules as children, plus the plain ``device`` attribute that
    ModelPatcher reads and writes (the backend modules expose ``device`` as a read-only property)."""

    def __init__(self, modules: dict, device: torch.device, dtype: torch.dtype):
        super().__init__()
        for k, v in modules.items():
            self.add_module(k, v)
        self.device = device
        self._uniar_dtype = dtype

    def get_dtype(self):
        return self._uniar_dtype


class UniARAutoregressive(_Holder):
    """The AR model (shown by this name in ComfyUI's model-management log)."""


class UniARImageDecoder(_Holder):
    """The SD3 image decoder: DiT + VAE + BSQ projections."""


def _patcher(kind, modules: dict, dtype: torch.dtype):
    holder = kind(modules, offload_device(), dtype)
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device(), offload_device=offload_device())


def _set_compute_device(module, device: torch.device) -> None:
    """Tell a backend module where to compute when ComfyUI leaves part of its weights on the offload device
    (low-VRAM streaming): only possible where the backend lets ``device`` be set."""
    prop = getattr(type(module), "device", None)
    if isinstance(prop, property) and prop.fset is None:
        return
    try:
        module.device = device
    except (AttributeError, TypeError):
        pass


def _bring_up(patcher) -> None:
    """``load_models_gpu`` + put buffers (not handled by ModelPatcher's partial load) on the compute device."""
    mm.load_models_gpu([patcher])
    dev = patcher.load_device
    holder = patcher.model
    for mod in holder.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[k] = b.to(dev)
    for child in holder.children():
        _set_compute_device(child, dev)


def _forget(patcher) -> None:
    """Drop a patcher from ComfyUI's loaded-model list and free its memory."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        lm = mm.current_loaded_models[i]
        if lm.model is patcher:
            try:
                lm.model_unload()
            except Exception:  # already detached
                pass
            mm.current_loaded_models.pop(i)
    try:
        patcher.detach()
    except Exception:
        pass
    patcher.model = None
    gc.collect()
    mm.soft_empty_cache()


_AR: dict = {}  # (path, dtype, attention) -> {"components": frozenset, "patcher": ModelPatcher}
_DEC: dict = {}  # (path, dtype, attention) -> {"patcher": ModelPatcher, "decoder": obj}


def _resolve(handle: UniARHandle):
    """-> (checkpoint, compute device, dtype name, cache key) of a handle."""
    dev = load_device()
    dtype = resolve_dtype(handle.dtype, dev)
    return handle.checkpoint(), dev, dtype, (handle.path, dtype, handle.attention)


def ar_model(handle: UniARHandle, components) -> tuple:
    """-> (checkpoint, UniARModel on the compute device) holding at least ``components``."""
    want = frozenset(components)
    ckpt, dev, dtype, key = _resolve(handle)
    with _LOCK:
        entry = _AR.get(key)
        if entry is None or not want <= entry["components"]:
            have = entry["components"] if entry else frozenset()
            union = want | have
            previous = None
            if entry is not None:
                # Adding components: the tensors already loaded are taken over (``reuse=``), only the new
                # components' weights are read from disk.
                log.info("UniAR: adding %s to %s (had %s)", sorted(want - have), handle.name, sorted(have))
                previous = entry["patcher"].model.ar
                _forget(entry["patcher"])
                _AR.pop(key, None)
            order = [c for c in ("llm", "vision", "lm_head", "gen_head") if c in union]
            # weights are read onto the offload device; the attention backend is chosen for the compute device
            model = ckpt.load_ar(components=order, device=offload_device(), compute_device=dev, dtype=dtype,
                                 attention=handle.attention, ops=comfy_ops(), reuse=previous)
            del previous
            patcher = _patcher(UniARAutoregressive, {"ar": model}, model.dtype)
            entry = {"components": frozenset(union), "patcher": patcher}
            _AR[key] = entry
        patcher = entry["patcher"]
        _bring_up(patcher)
        return ckpt, patcher.model.ar


def decoder_model(handle: UniARHandle):
    """-> (checkpoint, decoder) with its modules on the compute device."""
    from ..uniar_backend.decoder import load_decoder

    ckpt, dev, dtype, key = _resolve(handle)
    with _LOCK:
        entry = _DEC.get(key)
        if entry is None:
            attention = resolve_attention(handle.attention, dev, dtype)
            dec = load_decoder(ckpt, device=offload_device(), dtype=dtype,
                               attention="sdpa" if attention == "flash_attention_2" else attention,
                               ops=comfy_ops())
            if attention == "flash_attention_2":
                _set_decoder_attention(dec, attention)
            modules = {name: getattr(dec, name) for name in ("transformer", "vae", "bsq_proj", "text_encoders")
                       if isinstance(getattr(dec, name, None), torch.nn.Module)}
            first = next(iter(modules.values()))
            dt = next((p.dtype for p in first.parameters() if p.is_floating_point()), torch.float32)
            entry = {"patcher": _patcher(UniARImageDecoder, modules, dt), "decoder": dec}
            _DEC[key] = entry
        _bring_up(entry["patcher"])
        return ckpt, entry["decoder"]


def _set_decoder_attention(dec, attention: str) -> None:
    try:
        from ..uniar_backend.decoder.sd3 import set_attention
    except ImportError:
        return
    for name, is_vae in (("transformer", False), ("vae", True)):
        m = getattr(dec, name, None)
        if m is not None:
            set_attention(m, attention, vae=is_vae)


def unload_all() -> None:
    """Forget every cached UniAR model (tests, or a user's 'free memory')."""
    with _LOCK:
        for cache in (_AR, _DEC):
            for entry in cache.values():
                _forget(entry["patcher"])
            cache.clear()


# --------------------------------------------------------------------------------------------- progress, cancel
def progress_callback(total: int):
    """A backend ``callback(step, total)``: advances a ComfyUI progress bar and aborts on cancel."""
    pbar = comfy.utils.ProgressBar(max(1, int(total)))

    def cb(step: int, n: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(int(step), max(1, int(n)))

    return cb


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()
