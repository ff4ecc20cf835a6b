"""Locating and reading UniAR checkpoint files (safetensors only, single file or sharded with an index).

Layout of a UniAR checkpoint folder (``ShareLab-SII/UniAR-SFT`` / ``UniAR-RL``)::

    config.json, model.safetensors | model-0000x-of-0000y.safetensors + model.safetensors.index.json,
    tokenizer files, preprocessor_config.json, generation_config.json, chat_template.jinja   (AR model)
    bsq_encoder/      config.json + model.safetensors                                      (decoder features)
    sd3_transformer/  config.json + diffusion_pytorch_model.safetensors                     (SD3.5-M DiT)
    sd3_pipeline/     model_index.json, scheduler/, vae/, text_encoder*/, tokenizer*/       (VAE, schedule, ...)

Every component is checked and loaded on its own: captioning never needs the decoder folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Iterable

import torch

from .errors import CheckpointError
from .jsonfile import parse_json, read_json_file

log = logging.getLogger("UniAR")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):  # the fp8 weight format (uniar_backend.quant)
    _SAFETENSORS_DTYPES["F8_E4M3"] = torch.float8_e4m3fn


def read_header(path: str, fix: str = "re-download it") -> dict:
    """Read a safetensors header without loading tensors and check it against the file (offsets, dtypes, sizes);
    a CheckpointError ending in ``fix`` if the file is corrupt."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file is shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"header length {n} does not fit the file size {size}")
            raw = f.read(n)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({e}); {fix}") from None
    try:
        header = parse_json(raw, "its header", max_bytes=n, want=dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({e}); {fix}") from None
    data_len = size - 8 - n
    covered = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape, dtype = [int(x) for x in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{key}' has no valid offsets / shape / dtype; the file is corrupt; "
                                  f"{fix}") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise CheckpointError(
                f"{path}: tensor '{key}' lies beyond the end of the file (truncated download?); {fix}"
            )
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {str(dtype)[:20]!r}, which UniAR checkpoints do "
                                  f"not use ({', '.join(_SAFETENSORS_DTYPES)})")
        numel = 1
        for x in shape:
            numel *= x
        if min(shape, default=0) < 0 or numel * _SAFETENSORS_DTYPES[dtype].itemsize != end - start:
            raise CheckpointError(f"{path}: tensor '{key}' ({dtype} {shape}) does not match its {end - start} bytes; "
                                  f"the file is corrupt; {fix}")
        covered = max(covered, end)
    if covered != data_len:
        raise CheckpointError(f"{path}: the file is {data_len - covered} bytes longer than its header describes "
                              f"(an incomplete or damaged download?); {fix}")
    return header


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """A .safetensors file with a deterministic header (keys sorted, metadata sorted), byte for byte the same
    for the same tensors (``safetensors.save_file`` orders the metadata by a hash map: it changes run to run)."""
    spec = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    write_safetensors_streaming(path, spec, lambda names: {n: tensors[n] for n in names}, metadata)


def write_safetensors_streaming(path: str, spec: dict, produce: Callable[[list], dict],
                                metadata: dict | None = None) -> int:
    """:func:`write_safetensors` with the tensors made on demand: ``spec`` maps each name to ``(dtype, shape)``
    (the header is written first), ``produce(names)`` returns the tensors of a few names at a time (in sorted
    order, grouped by their common prefix), so only those are in memory.  Returns the bytes written."""
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    order = sorted(spec)
    for name in order:
        dt, shape = spec[name]
        n = dt.itemsize
        for x in shape:
            n *= int(x)
        header[name] = {"dtype": names[dt], "shape": [int(x) for x in shape], "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}, **header}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    groups: dict[str, list[str]] = {}
    for name in order:  # the tensors of one layer come from one source tensor: ask for them together
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    made: dict = {}
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:  # in header order; a group's other tensors wait in ``made`` until their turn
            if name not in made:
                made.update(produce(groups.pop(name.rsplit(".", 1)[0])))
            t = made.pop(name).detach().to("cpu").contiguous()
            if (t.dtype, tuple(t.shape)) != (spec[name][0], tuple(spec[name][1])):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, announced {spec[name]}")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return 8 + len(raw) + offset


class WeightFiles:
    """The safetensors files of one component: ``{base}.safetensors`` or shards listed in ``{base}.safetensors.index.json``."""

    def __init__(self, folder: str, base: str = "model"):
        self.folder = folder
        self.base = base
        single = os.path.join(folder, f"{base}.safetensors")
        index = os.path.join(folder, f"{base}.safetensors.index.json")
        self.key_to_file: dict[str, str] = {}
        self.headers: dict[str, dict] = {}
        if os.path.isfile(index):
            weight_map = read_json_file(index, "re-download it").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            # by name: a shard is a path inside the folder (a shard that is a link the user made, e.g. into a
            # Hub cache, is fine; '../x' or '/x' in a downloaded index is not)
            root = os.path.abspath(folder)
            outside = [fn for fn in files if os.path.isabs(fn) or os.path.commonpath(
                [root, os.path.normpath(os.path.join(root, fn))]) != root]
            if outside:
                raise CheckpointError(f"{index}: shard {outside[0][:200]!r} is not a file of this folder; a checkpoint "
                                      "index may only name shard files beside it")
            missing = [fn for fn in files if not os.path.isfile(os.path.join(folder, fn))]
            if missing:
                raise CheckpointError(
                    f"{folder}: missing shard file(s) {', '.join(missing)} listed in {os.path.basename(index)}; "
                    "the download is incomplete"
                )
            for fn in files:
                path = os.path.join(folder, fn)
                self.headers[path] = read_header(path)
            for key, fn in weight_map.items():
                path = os.path.join(folder, fn)
                if key not in self.headers[path]:
                    raise CheckpointError(f"{path}: tensor '{key}' listed in the index is not in the shard")
                self.key_to_file[key] = path
        elif os.path.isfile(single):
            self.headers[single] = read_header(single)
            self.key_to_file = {k: single for k in self.headers[single] if k != "__metadata__"}
        else:
            pickles = [fn for fn in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if fn.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (f" (found {', '.join(sorted(pickles))}: pickle checkpoints are not loaded for safety; "
                    "use the .safetensors release)") if pickles else ""
            raise CheckpointError(f"{folder}: no {base}.safetensors or {base}.safetensors.index.json{hint}")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def info(self, key: str) -> tuple[list[int], torch.dtype]:
        h = self.headers[self.key_to_file[key]][key]
        return list(h["shape"]), _SAFETENSORS_DTYPES.get(h["dtype"], None)

    def total_bytes(self, keys: Iterable[str] | None = None) -> int:
        total = 0
        for k in (keys if keys is not None else self.key_to_file):
            start, end = self.headers[self.key_to_file[k]][k]["data_offsets"]
            total += end - start
        return total

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read tensors (on the CPU) grouped by file."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.key_to_file[k], []).append(k)
        out = {}
        for path, ks in by_file.items():
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for k in ks:
                        out[k] = f.get_tensor(k)
            except Exception as e:
                raise CheckpointError(f"{path}: could not read tensors ({type(e).__name__}: {e}); re-download it") from None
        return out

    def fingerprint(self, key_filter: Callable[[str], bool], strip: str = "") -> str:
        """A short hash of the tensors selected by ``key_filter`` (names without ``strip``; values rounded to
        bfloat16 first, so the same weights stored in float32 or bfloat16 give the same fingerprint)."""
        h = hashlib.sha256()
        keys = sorted(k for k in self.key_to_file if key_filter(k))
        tensors = self.read(keys)
        for k in keys:
            h.update(k[len(strip):].encode() if k.startswith(strip) else k.encode())
            h.update(tensors[k].to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]


def _container(key: str) -> str:
    """The module container a checkpoint key belongs to: the path up to its first numbered part
    (``model.language_model.layers.4.mlp.up_proj.weight`` -> ``model.language_model.layers.``), else its module
    (``lm_head.weight`` -> ``lm_head.``)."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:i]) + "."
    return ".".join(parts[:-1]) + "."


def in_loaded_parts(keys, wanted) -> list[str]:
    """The checkpoint ``keys`` that lie inside a module container a load of the keys ``wanted`` reads; keys of
    parts that were not asked for (another component's containers) are left out."""
    loaded = {_container(k) for k in wanted}
    return [k for k in keys if _container(k) in loaded]


def unexpected_keys(available, wanted) -> list[str]:
    """Checkpoint keys that lie inside a container the module loads but that the module does not have: a layer
    or block beyond the config's count, or a tensor a loaded layer lacks.  Keys of parts that were not asked
    for (another component's containers) are not looked at."""
    return sorted(k for k in in_loaded_parts(available, wanted) if k not in wanted)


def build_on_meta(factory: Callable[[object], torch.nn.Module], ops=None, post: Callable | None = None):
    """``factory(ops)`` built on the meta device, and the layout of its tensors.

    -> ``(module, layout)``; ``layout`` maps every state-dict key the module will hold to a meta tensor of its
    shape and dtype.  It is read from a twin built with plain ``torch.nn`` layers (``factory(None)``), not from
    ``module.state_dict()``: a layer class may create its weights lazily (ComfyUI's ``comfy.ops`` layers under
    dynamic VRAM keep ``weight = None`` until ``_load_from_state_dict`` hands them a tensor), so the module's own
    state dict does not list every key it loads.  Building twice on the meta device costs no memory.
    ``post(module, twin)`` runs on both (e.g. replacing layers by quantised ones), the module first, with the
    plain twin as the reference for what the lazy layers do not show yet (a lazy Linear has no bias before
    loading)."""
    with torch.device("meta"):
        module = factory(ops)
        twin = module if ops is None else factory(None)
        if post is not None:
            if twin is not module:
                post(module, twin)
            post(twin, twin)
        layout = dict(twin.state_dict(keep_vars=True))
    return module, layout


def _stored(t) -> bool:
    """A tensor kept in its stored dtype (the codes and scales of a quantised layer), not the compute dtype."""
    return bool(getattr(t, "uniar_stored", False))


def _target_dtype(slot, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if _stored(slot):
        return slot.dtype
    return dtype if t.is_floating_point() else slot.dtype


def load_module_weights(
    module: torch.nn.Module,
    files: WeightFiles,
    key_map: Callable[[str], str],
    dtype: torch.dtype,
    device: torch.device | str,
    what: str = "model",
    preloaded: dict[str, torch.Tensor] | None = None,
    layout: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load ``files`` into ``module`` (built on the meta device): every tensor of the module must be present in
    the checkpoint (under ``key_map(module_key)``) with the right shape; checkpoint keys of components that were
    not asked for are simply not read.  Nothing is assigned until every check has passed.

    ``layout`` (from :func:`build_on_meta`) lists the module's keys where its layer classes create weights
    lazily; by default the module's own ``state_dict()``.  The tensors reach the module through the standard
    ``load_state_dict(strict=True, assign=True)`` protocol, so each layer's own ``_load_from_state_dict`` takes
    them (lazy layers included), and a tensor no layer took is an error."""
    state = layout if layout is not None else module.state_dict(keep_vars=True)
    lazy = len(state.keys() - module.state_dict(keep_vars=True).keys())  # weights the layers create when given
    wanted = {key_map(name): name for name in state}  # ckpt key -> module key
    available = set(files.keys())
    missing = sorted(k for k in wanted if k not in available)
    if missing:
        raise CheckpointError(
            f"{files.folder}: {len(missing)} weight(s) of the {what} are missing from the checkpoint "
            f"(e.g. {', '.join(missing[:3])}); the checkpoint does not match its config.json or is incomplete"
        )
    extra = unexpected_keys(available, wanted)
    if extra:
        raise CheckpointError(
            f"{files.folder}: {len(extra)} weight(s) of the {what} are not in the model config.json describes "
            f"(e.g. {', '.join(extra[:3])}); config.json does not match the weights (layer counts?)"
        )
    for ck, mk in wanted.items():
        shape, fdtype = files.info(ck)
        if list(state[mk].shape) != shape:
            raise CheckpointError(
                f"{files.key_to_file[ck]}: tensor '{ck}' has shape {shape}, config.json implies "
                f"{list(state[mk].shape)}; the weights do not match the config"
            )
        if _stored(state[mk]) and fdtype != state[mk].dtype:
            raise CheckpointError(
                f"{files.key_to_file[ck]}: tensor '{ck}' is stored as {fdtype}, but this weight format keeps it as "
                f"{state[mk].dtype}; the folder mixes weight formats or is damaged: convert the float checkpoint again"
            )
        if fdtype.is_floating_point != state[mk].is_floating_point() or (fdtype == torch.bool) != (
                state[mk].dtype == torch.bool):
            raise CheckpointError(
                f"{files.key_to_file[ck]}: tensor '{ck}' is stored as {fdtype}, but the model needs a "
                f"{'floating-point' if state[mk].is_floating_point() else str(state[mk].dtype)} tensor there; "
                "the file is damaged or not a UniAR checkpoint"
            )
    # Read file by file (one shard at a time) and move each tensor to its device/dtype right away, so peak host
    # memory stays around one shard; assign only when everything was read.
    new_state = {}
    if preloaded:  # tensors of an already loaded model (same checkpoint): take them over, read nothing
        for ck, mk in list(wanted.items()):
            t = preloaded.get(mk)
            if t is not None and list(t.shape) == list(state[mk].shape) and t.device.type != "meta":
                new_state[mk] = t.to(device=device, dtype=_target_dtype(state[mk], t, dtype))
                del wanted[ck]
    by_file: dict[str, list[str]] = {}
    for ck in wanted:
        by_file.setdefault(files.key_to_file[ck], []).append(ck)
    for path, keys in by_file.items():
        tensors = files.read(keys)
        for ck in keys:
            t = tensors.pop(ck)
            mk = wanted[ck]
            if getattr(state[mk], "uniar_finite", False) and t.is_floating_point() and not bool(t.isfinite().all()):
                bad = int((~t.isfinite()).sum())
                raise CheckpointError(f"{path}: tensor '{ck}' holds {bad} NaN or infinite value(s); a quantised "
                                      "layer's scales must be finite (the file is damaged, or the float weights it was "
                                      "converted from hold NaN / inf): convert the float checkpoint again")
            new_state[mk] = t.to(device=device, dtype=_target_dtype(state[mk], t, dtype))
        del tensors
    module.load_state_dict(new_state, strict=True, assign=True)
    loaded = module.state_dict(keep_vars=True)
    left = [k for k in state if k not in loaded]
    left += [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{files.folder}: the {what} kept {len(left)} tensor(s) without weights after loading "
                              f"(e.g. {', '.join(left[:3])}); its layer classes did not take the checkpoint tensors")
    if lazy:
        log.info("UniAR: %s: %d tensors loaded, %d of them into lazily created layers", what, len(state), lazy)
