"""Glue between the UniAR backend and ComfyUI's model management.

``UniARHandle`` is what travels on ``UNIAR_MODEL`` sockets: a light description (checkpoint folder, dtype,
attention) plus the slot of parts loaded for it.  The heavy parts are loaded on first use, only the components
a node needs, and wrapped in the patcher ComfyUI uses for its own models (``CoreModelPatcher``: the dynamic-VRAM
``ModelPatcherDynamic`` where ComfyUI runs with it, else ``ModelPatcher``):

* the AR model (``Checkpoint.load_ar``): one ``UniARModel`` per slot holding the union of the components asked
  for so far (caption: llm + lm_head (+ vision); generate: llm + gen_head (+ vision for edit images); encode:
  vision).  A node that needs a component not loaded yet takes the loaded tensors over and reads only the new
  component's weights; re-running a node never re-reads the files.
* the image decoder (``load_decoder``): SD3 transformer + VAE + BSQ projection in one patcher; it never loads
  the LLM, and captioning never loads it.

Weights are read onto ComfyUI's offload device into ``comfy.ops`` layers (lazily created weights of dynamic VRAM
included: the loader hands every tensor to the layer's own ``_load_from_state_dict``);
``comfy.model_management.load_models_gpu`` brings them onto the compute device before every use, so ComfyUI
streams them, evicts them when other models need the memory and reloads them without touching the files.
The slot lives as long as a handle names it (the node outputs ComfyUI caches), like ComfyUI's own models.
Devices come from model management (``--cpu``, ``--lowvram``, ``--gpu-only`` respected).

Every patcher made here carries ``cached_patcher_init``: a factory that rebuilds it from the checkpoint files,
which ComfyUI's multi-GPU support (0.23+: *MultiGPU CFG Split*, *Select Model Device* / *Select VAE Device*) and
its non-dynamic clones (``clone(disable_dynamic=True)``) call instead of copying loaded weights (see
"rebuild factories" below).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

log = logging.getLogger("UniAR")
_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------- the handle
class _Slot:
    """The loaded parts of one (checkpoint, dtype, attention): ``ar`` and ``dec`` entries (a patcher each).

    Owned by the handles that name it, the way core ComfyUI's models are owned by the node outputs that hold
    them: when ComfyUI drops those outputs ("Free model and node cache", ``POST /free`` with ``free_memory``,
    or a loader re-run with other inputs), the slot and the host copies of its weights go with them."""

    def __init__(self):
        self.ar: dict | None = None
        self.dec: dict | None = None
        self.cond: dict | None = None  # the token conditioner of the native route (no patcher: a few MB)

    def __copy__(self):  # a copied handle names the same loaded parts
        return self

    def __deepcopy__(self, memo):
        return self

    def release(self) -> None:
        self.cond = None
        for name in ("ar", "dec"):
            entry = getattr(self, name)
            setattr(self, name, None)
            if entry is not None:
                _release(entry["patcher"])


_SLOTS: "weakref.WeakValueDictionary[tuple, _Slot]" = weakref.WeakValueDictionary()


def _slot_for(key: tuple) -> _Slot:
    with _LOCK:
        slot = _SLOTS.get(key)
        if slot is None:
            slot = _Slot()
            _SLOTS[key] = slot
            weakref.finalize(slot, log.info, "UniAR: released the loaded parts of %s (dtype %s, attention %s)",
                             os.path.basename(key[0].rstrip("/\\")), key[1], key[2])
        return slot


@dataclass(frozen=True)
class UniARHandle:
    """The ``UNIAR_MODEL`` value: where the checkpoint is and how to load it, plus (not compared) the slot of
    parts loaded for it.  Handles of the same (path, dtype, attention) share one slot."""

    path: str
    dtype: str = "auto"
    attention: str = "auto"
    weights: str | None = None  # int8 / fp8 / int4: quantise a float folder while loading (None: as stored)
    slot: _Slot = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.slot is None:
            object.__setattr__(self, "slot", _slot_for((self.path, self.dtype, self.attention, self.weights)))

    @property
    def name(self) -> str:
        return folder_name(self.path)

    def checkpoint(self):
        return get_checkpoint(self.path)

    def __repr__(self):
        w = f", weights={self.weights}" if self.weights else ""
        return f"UniAR({self.name}, dtype={self.dtype}, attention={self.attention}{w})"


def folder_name(path: str) -> str:
    return os.path.basename(path.rstrip("/\\"))


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


def comfy_ops():
    """Layers whose weights ComfyUI can stream (low-VRAM) and cast on the fly.  Weight dtype = compute dtype
    here, so ``disable_weight_init`` (the ops ComfyUI itself uses in that case) is the right set: ModelPatcher
    switches single layers to casting mode when it leaves their weights on the offload device."""
    return comfy.ops.disable_weight_init


# --------------------------------------------------------------------------------------------- patchers
class _Holder(torch.nn.Module):
    """What a model patcher wraps: the backend modules as children, plus the plain ``device`` attribute that
    the patchers read and write (the backend modules expose ``device`` as a property)."""

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


def patcher_class(disable_dynamic: bool = False):
    """The patcher ComfyUI uses for its own models: ``CoreModelPatcher`` where it exists (0.28+: it is
    ``ModelPatcherDynamic`` when dynamic VRAM is on, which streams weights on demand and evicts other models only
    as far as needed; on a CPU load device that class hands back a plain ``ModelPatcher`` itself), else the
    ``ModelPatcher`` of older releases.  Read at call time: ComfyUI's ``main.py`` sets it at start-up.
    ``disable_dynamic``: the plain ``ModelPatcher`` that ComfyUI's rebuild factories are asked for (a non-dynamic
    clone: torch.compile, hooks, Select Model Device's cpu)."""
    mp = comfy.model_patcher
    if disable_dynamic:
        return mp.ModelPatcher
    return getattr(mp, "CoreModelPatcher", None) or mp.ModelPatcher


def _new_patcher(model, disable_dynamic: bool = False):
    """A patcher of ``model`` on the compute device (:func:`patcher_class`)."""
    return patcher_class(disable_dynamic)(model, load_device=load_device(), offload_device=offload_device())


def _patcher(kind, modules: dict, dtype: torch.dtype, disable_dynamic: bool = False):
    return _new_patcher(kind(modules, offload_device(), dtype), disable_dynamic)


def _with_factory(patcher, factory, args: tuple):
    """Give ``patcher`` its ``cached_patcher_init`` (see "rebuild factories" below)."""
    patcher.cached_patcher_init = (factory, tuple(args))
    return patcher


def _is_dynamic(patcher) -> bool:
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


def _set_compute_device(module, device: torch.device) -> None:
    """Tell a backend module where to compute when part of its weights stay on the offload device (streamed):
    only possible where the backend lets ``device`` be set."""
    prop = getattr(type(module), "device", None)
    if isinstance(prop, property) and prop.fset is None:
        return
    try:
        module.device = device
    except (AttributeError, TypeError):
        pass


def _bring_up(patcher) -> None:
    """``load_models_gpu``, then tell the backend modules their compute device.

    The dynamic patcher moves buffers itself.  The legacy ``ModelPatcher`` moves the modules that own parameters
    but, in a partial (low-VRAM) load, not the buffers of parameter-free modules (the rotary tables): those are
    moved here."""
    mm.load_models_gpu([patcher])
    dev = patcher.load_device
    holder = patcher.model
    if not _is_dynamic(patcher):
        for mod in holder.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None and b.device != dev:
                    mod._buffers[k] = b.to(dev)
    for child in holder.children():
        _set_compute_device(child, dev)


def _release(patcher) -> None:
    """Put a patcher's weights back on the offload device (ComfyUI's own unload step) and drop it.  ComfyUI's
    list of loaded models holds patchers weakly and forgets this one when it is collected."""
    try:
        patcher.detach()
    except Exception as e:  # already detached, or a half-built patcher
        log.debug("UniAR: detach failed (%s)", e)


def _resolve(handle: UniARHandle):
    """-> (checkpoint, compute device, dtype name, cache key) of a handle."""
    dev = load_device()
    dtype = resolve_dtype(handle.dtype, dev)
    return handle.checkpoint(), dev, dtype, (handle.path, dtype, handle.attention, handle.weights)


def ar_model(handle: UniARHandle, components):
    """-> the AR model (:class:`~uniar_backend.api.UniAR`) on the compute device, holding at least
    ``components``."""
    from ..uniar_backend.api import UniAR

    want = frozenset(components)
    ckpt, _, dtype, key = _resolve(handle)
    slot = handle.slot
    with _LOCK:
        entry = slot.ar
        if entry is None or entry["key"] != key or not want <= entry["components"]:
            have = entry["components"] if entry is not None and entry["key"] == key else frozenset()
            union = want | have
            previous = None
            if entry is not None:
                slot.ar = None
                _release(entry["patcher"])
                if have:
                    # Adding components: the tensors already loaded are taken over (``reuse=``), only the new
                    # components' weights are read from disk.
                    log.info("UniAR: adding %s to %s (had %s)", sorted(want - have), handle.name, sorted(have))
                    previous = entry["patcher"].model.ar
                del entry
            patcher = ar_patcher(handle.path, dtype, union, handle.attention, handle.weights, reuse=previous)
            del previous
            slot.ar = {"key": key, "components": frozenset(union), "patcher": patcher}
        patcher = slot.ar["patcher"]
        _bring_up(patcher)
        return UniAR(ckpt, patcher.model.ar)


def decoder_model(handle: UniARHandle):
    """-> (checkpoint, decoder) with its modules on the compute device."""
    ckpt, _, dtype, key = _resolve(handle)
    slot = handle.slot
    with _LOCK:
        entry = slot.dec
        if entry is None or entry["key"] != key:
            if entry is not None:
                slot.dec = None
                _release(entry["patcher"])
                del entry
            patcher = decoder_patcher(handle.path, dtype, handle.attention, handle.weights)
            slot.dec = {"key": key, "patcher": patcher, "decoder": patcher.model.uniar_decoder}
        _bring_up(slot.dec["patcher"])
        _set_compute_device(slot.dec["decoder"], slot.dec["patcher"].load_device)
        return ckpt, slot.dec["decoder"]


def native_decoder(handle: UniARHandle):
    """-> (MODEL patcher, VAE) of the native route: the checkpoint's DiT as a ComfyUI model and its VAE (both
    halves) as a core VAE (``native_model.py``), read onto the offload device; ComfyUI's samplers and VAE nodes
    bring them up.  Both carry their rebuild factory (:func:`native_dit_patcher`, :func:`native_vae_patcher`)."""
    _, _, dtype, _ = _resolve(handle)
    patcher = native_dit_patcher(handle.path, dtype, handle.attention, handle.weights)
    return patcher, native_vae(handle.path, dtype, handle.attention)


def conditioner(handle: UniARHandle):
    """-> the handle's :class:`~uniar_backend.decoder.conditioning.TokenConditioner` (BSQ projections on the
    offload device, decoder-prompt embeddings), loaded once per slot."""
    from ..uniar_backend.decoder.conditioning import load_conditioner

    ckpt, dev, dtype, key = _resolve(handle)
    slot = handle.slot
    with _LOCK:
        if slot.cond is None or slot.cond["key"] != key:
            slot.cond = {"key": key, "conditioner": load_conditioner(ckpt, offload_device(), dtype,
                                                                     ops=comfy_ops())}
        return slot.cond["conditioner"]


def unload_all() -> None:
    """Release every loaded UniAR part (tests; the handles stay valid and load again on next use)."""
    with _LOCK:
        for slot in list(_SLOTS.values()):
            slot.release()
    gc.collect()
    mm.soft_empty_cache()


# --------------------------------------------------------------------------------------------- rebuild factories
# ComfyUI (0.23+) never copies a loaded model to give it to another device or to make a plain (non-dynamic)
# patcher of a dynamic one: it calls the loader again through the patcher's ``cached_patcher_init = (factory,
# args)`` -- ``factory(*args)`` in ``ModelPatcher.deepclone_multigpu`` (MultiGPU CFG Split: one clone per extra
# GPU; Select Model / VAE Device: a GPU other than the model's), ``factory(*args, disable_dynamic=True)`` in
# ``ModelPatcher.clone(disable_dynamic=True)`` (a dynamic patcher asked for a plain one) -- and takes the fresh
# patcher's ``model``.  These are those factories: module functions of strings (folder, dtype resolved for the
# first device, attention, weight format), so storing them costs nothing and a rebuild reads the same files with
# the same options; the caller sets the clone's load device.  On releases without multi-GPU support (0.3.64)
# nothing reads the attribute.

def native_dit_patcher(path: str, dtype: str, attention: str = "auto", weights: str | None = None,
                       disable_dynamic: bool = False):
    """The native route's ``MODEL``: the checkpoint's DiT as a :class:`~.native_model.UniARDiTModel` in a patcher
    whose ``cached_patcher_init`` is this function with these arguments.  Reads the DiT's weights only (the VAE's
    config gives the latent format)."""
    from ..uniar_backend.decoder import components as C
    from .native_model import UniARDiTModel, UniARModelConfig

    root, dev, dt, backend = _native_setup(path, dtype, attention)
    sched_cfg = C.check_parts(root)  # cheap checks of every part before anything heavy
    fingerprint = C.read_bsq_fingerprint(root)
    vae_config, scale = _latent_geometry(root)
    off = offload_device()
    dit = C.load_transformer(root, off, dt, backend, weights=weights, compute_device=dev, ops=comfy_ops())
    model = UniARDiTModel(UniARModelConfig(sched_cfg, vae_config, scale), dit, dt, fingerprint, folder_name(path),
                          device=off)
    return _with_factory(_new_patcher(model, disable_dynamic), native_dit_patcher, (path, dtype, attention, weights))


def native_vae(path: str, dtype: str, attention: str = "auto", disable_dynamic: bool = False):
    """The native route's ``VAE`` (:class:`~.native_model.UniARVAE`, both halves); its patcher's factory is
    :func:`native_vae_patcher` (core's VAE loader does the same with ``comfy.sd.load_vae_patcher``)."""
    from ..uniar_backend.decoder import components as C
    from .native_model import UniARVAE

    root, _, dt, backend = _native_setup(path, dtype, attention)
    _, scale = _latent_geometry(root)
    off = offload_device()
    decoder = C.load_vae(root, off, dt, backend, ops=comfy_ops())
    encoder = C.load_vae(root, off, dt, backend, ops=comfy_ops(), part="encoder")
    vae = UniARVAE(decoder, encoder, scale, patcher_class(disable_dynamic))
    _with_factory(vae.patcher, native_vae_patcher, (path, dtype, attention))
    return vae


def native_vae_patcher(path: str, dtype: str, attention: str = "auto", disable_dynamic: bool = False):
    """The factory of the native VAE's patcher: a fresh :func:`native_vae`'s patcher (its ``model`` is what
    Select VAE Device makes the VAE's ``first_stage_model``)."""
    return native_vae(path, dtype, attention, disable_dynamic).patcher


def ar_patcher(path: str, dtype: str, components, attention: str = "auto", weights: str | None = None,
               disable_dynamic: bool = False, reuse=None):
    """The AR model of ``components`` in a patcher; its factory is this function without ``reuse`` (the tensors
    of an already loaded model to take over, see :func:`ar_model`), so a rebuild reads every component."""
    order = tuple(c for c in AR_COMPONENTS if c in components)
    # weights are read onto the offload device; the attention backend is chosen for the compute device
    model = get_checkpoint(path).load_ar(components=list(order), device=offload_device(),
                                         compute_device=load_device(), dtype=dtype, attention=attention,
                                         ops=comfy_ops(), reuse=reuse, weights=weights)
    patcher = _patcher(UniARAutoregressive, {"ar": model}, model.dtype, disable_dynamic)
    return _with_factory(patcher, ar_patcher, (path, dtype, order, attention, weights))


def decoder_patcher(path: str, dtype: str, attention: str = "auto", weights: str | None = None,
                    disable_dynamic: bool = False):
    """UniAR Decode's decoder (DiT + VAE + BSQ projections) in one patcher; the backend's decoder object is
    ``patcher.model.uniar_decoder``."""
    from ..uniar_backend.decoder import load_decoder

    # weights are read onto the offload device; the attention backend is chosen for the compute device
    dec = load_decoder(get_checkpoint(path), device=offload_device(), compute_device=load_device(), dtype=dtype,
                       attention=attention, ops=comfy_ops(), weights=weights)
    modules = {name: getattr(dec, name) for name in ("transformer", "vae", "bsq_proj", "text_encoders")
               if isinstance(getattr(dec, name, None), torch.nn.Module)}
    first = next(iter(modules.values()))
    dt = next((p.dtype for p in first.parameters() if p.is_floating_point()), torch.float32)
    patcher = _patcher(UniARImageDecoder, modules, dt, disable_dynamic)
    patcher.model.uniar_decoder = dec  # a plain attribute (not a module): its modules are the holder's children
    return _with_factory(patcher, decoder_patcher, (path, dtype, attention, weights))


AR_COMPONENTS = ("llm", "vision", "lm_head", "gen_head")  # the AR components in load order


def _native_setup(path: str, dtype: str, attention: str):
    """-> (decoder root folder, compute device, torch dtype, DiT attention backend) of the native route."""
    from ..uniar_backend.decoder import components as C
    from ..uniar_backend.runtime import resolve_attention

    dev = load_device()
    dt = getattr(torch, dtype)
    return C.checkpoint_root(get_checkpoint(path)), dev, dt, resolve_attention(attention, dev, dt)


def _latent_geometry(root: str):
    """-> (the VAE's config, pixels per latent cell) without reading weights (the config as the VAE reads it, from
    a VAE decoder built on the meta device), the VAE's latent channels checked against the DiT's."""
    from types import SimpleNamespace

    from ..uniar_backend.decoder import components as C
    from ..uniar_backend.decoder.vae import VAEDecoder

    with torch.device("meta"):
        config = VAEDecoder(C.read_vae_config(root)).config
    dit = SimpleNamespace(config=SimpleNamespace(in_channels=C.read_transformer_config(root)["in_channels"]))
    return config, C.latent_scale(root, dit, SimpleNamespace(config=config))


# --------------------------------------------------------------------------------------------- progress, cancel
class Progress:
    """A backend ``callback(step, total)``: advances a ComfyUI progress bar and aborts on cancel.  ``show(image)``
    puts a PIL image on the bar (ComfyUI's live preview, as its samplers send latent previews)."""

    PREVIEW_SIZE = 512

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.step = 0
        self.pbar = comfy.utils.ProgressBar(self.total)

    def __call__(self, step: int, n: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.step, self.total = int(step), max(1, int(n))
        self.pbar.update_absolute(self.step, self.total)

    def show(self, image) -> None:
        self.pbar.update_absolute(self.step, self.total, ("JPEG", image, self.PREVIEW_SIZE))


def progress_callback(total: int) -> Progress:
    return Progress(total)


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()
