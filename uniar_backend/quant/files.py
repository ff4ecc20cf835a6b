"""Quantised weights seen through the checkpoint reader: a folder stored quantised, or a float folder quantised
while it is read (``weights=...`` at load time).  Both present the module's keys to
:func:`uniar_backend.checkpoint.load_module_weights`, which checks shapes and dtypes and loads one file at a time."""

from __future__ import annotations

import torch

from ..checkpoint import in_loaded_parts
from ..errors import CheckpointError
from . import CONFIG_KEY, FORMATS, check_requested
from .formats import Format, check_comfy_quant_layout, comfy_quant_tensor, get, read_comfy_quant

QUANT_SUFFIXES = ("weight_scale", "weight_zeros", "comfy_quant", "scale_weight", "weight_scale_2", "input_scale")


def stored_format(cfg: dict, path: str) -> str | None:
    """The format a config records (``uniar_quantization.format``), None for float weights."""
    q = cfg.get(CONFIG_KEY)
    if q is None:
        return None
    name = q.get("format") if isinstance(q, dict) else None
    if name not in FORMATS:
        raise CheckpointError(f"{path}: {CONFIG_KEY} names the weight format {str(name)[:40]!r}, which this pack "
                              f"does not know ({', '.join(FORMATS)}); convert the float checkpoint again with "
                              "`python -m uniar_backend quantize`")
    return name


def record(cfg: dict, fmt: Format) -> dict:
    """``cfg`` with the format recorded (what the converter writes into config.json)."""
    out = dict(cfg)
    out[CONFIG_KEY] = {"format": fmt.name, "comfy_quant": fmt.comfy_quant(), "version": 1}
    return out


def quantized_tensors(prefix: str, w: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantised Linear ``prefix`` from its float weight."""
    if w.dim() != 2 or not w.is_floating_point():
        raise CheckpointError(f"tensor '{prefix}.weight' ({w.dtype}, {list(w.shape)}) is not a float matrix; "
                              "only float checkpoints can be quantised")
    out = {f"{prefix}.{k}": v for k, v in fmt.quantize(w).items()}
    out[f"{prefix}.comfy_quant"] = comfy_quant_tensor(fmt)
    return out


def looks_quantized(keys) -> str | None:
    """A key that only a quantised checkpoint has (None if there is none)."""
    for k in keys:
        if k.rsplit(".", 1)[-1] in QUANT_SUFFIXES:
            return k
    return None


class _View:
    """What load_module_weights reads: ``folder``, ``keys()``, ``info()``, ``key_to_file``, ``read()``."""

    def __init__(self, files, fmt: Format, targets: list[str]):
        self.files, self.fmt, self.targets = files, fmt, list(targets)
        self.folder = files.folder


class StoredView(_View):
    """A folder stored in ``fmt``: every target layer must carry the format's tensors and a ``comfy_quant`` of the
    same format, and no other layer of the parts being loaded may be quantised (a mixed folder is refused).

    ``loads`` (checkpoint keys of the module being loaded) limits the check to the parts asked for: the markers
    of parts that are not loaded (the image head's ``visual_decoder`` when only the vision tower loads for a
    caption) belong to targets of another load, exactly as :func:`~uniar_backend.checkpoint.unexpected_keys`
    leaves their tensors alone.  None: every marker in the files is checked (the whole model is loaded)."""

    def __init__(self, files, fmt, targets, loads=None):
        super().__init__(files, fmt, targets)
        want = fmt.comfy_quant()
        keys = set(files.keys())
        marks = sorted(k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant"))
        if loads is not None:
            marks = [k[: -len(".weight")] for k in in_loaded_parts([m + ".weight" for m in marks], loads)]
        wanted = set(self.targets)
        stray = [m for m in marks if m not in wanted]
        if stray:
            raise CheckpointError(f"{files.folder}: layer '{stray[0]}' is quantised, but in {fmt.name} this pack keeps "
                                  "it in the compute dtype; the folder mixes formats: convert the float checkpoint "
                                  "again")
        lacking = [t for t in self.targets if f"{t}.comfy_quant" not in keys]
        if lacking:
            raise CheckpointError(f"{files.folder}: {len(lacking)} layer(s) of a {fmt.name} checkpoint are not quantised "
                                  f"(e.g. '{lacking[0]}' has no comfy_quant); the folder mixes float and {fmt.name} "
                                  "weights: convert the float checkpoint again")
        for t, conf in zip(marks, self._confs(marks)):
            if any(conf.get(k) != v for k, v in want.items()):
                raise CheckpointError(f"{files.key_to_file[t + '.comfy_quant']}: layer '{t}' is stored as "
                                      f"{conf.get('format')!r} {conf.get('group_size', '')}, but config.json records "
                                      f"{fmt.name} ({fmt.comfy_name}); the folder mixes formats")
        self.key_to_file = {k: v for k, v in files.key_to_file.items() if not k.endswith(".comfy_quant")}

    def _confs(self, marks):
        for m in marks:  # from the header: a marker of the wrong shape or size is refused before it is read
            shape, dtype = self.files.info(m + ".comfy_quant")
            check_comfy_quant_layout(shape, dtype, f"{self.files.key_to_file[m + '.comfy_quant']}: {m}")
        tensors = self.files.read([m + ".comfy_quant" for m in marks])  # a few bytes each
        return [read_comfy_quant(tensors[m + ".comfy_quant"], f"{self.files.folder}: {m}") for m in marks]

    def keys(self):
        return list(self.key_to_file)

    def info(self, key):
        return self.files.info(key)

    def read(self, keys):
        return self.files.read(keys)


class ConvertingView(_View):
    """A float folder read as if it were stored in ``fmt``: each target's ``weight`` is quantised as it is read
    (one layer at a time).  The loader reads it (``marks`` False: the module has no ``comfy_quant`` tensors); the
    converter writes it out file by file (``marks`` True: the files get them)."""

    def __init__(self, files, fmt, targets, marks: bool = False):
        super().__init__(files, fmt, targets)
        layout = fmt.layout
        if marks:
            cq = comfy_quant_tensor(fmt)
            layout = lambda n, k: {**fmt.layout(n, k), "comfy_quant": (tuple(cq.shape), cq.dtype)}  # noqa: E731
        self.key_to_file = dict(files.key_to_file)
        self._virtual: dict[str, str] = {}  # virtual key -> target
        self._shape: dict[str, tuple] = {}
        for t in self.targets:
            src = f"{t}.weight"
            if src not in files.key_to_file:
                continue  # load_module_weights names the missing weight
            shape, fdtype = files.info(src)
            if len(shape) != 2:
                raise CheckpointError(f"{files.key_to_file[src]}: tensor '{src}' has shape {shape}, not a matrix")
            path = self.key_to_file.pop(src)
            for suffix, (s, dt) in layout(shape[0], shape[1]).items():
                self.key_to_file[f"{t}.{suffix}"] = path
                self._virtual[f"{t}.{suffix}"] = t
                self._shape[f"{t}.{suffix}"] = (list(s), dt)

    def keys(self):
        return list(self.key_to_file)

    def info(self, key):
        if key in self._virtual:
            return self._shape[key]
        return self.files.info(key)

    def read(self, keys):
        keys = list(keys)
        plain = [k for k in keys if k not in self._virtual]
        layers = list(dict.fromkeys(self._virtual[k] for k in keys if k in self._virtual))
        out = self.files.read(plain)
        for t in layers:  # one float weight at a time
            w = self.files.read([f"{t}.weight"])[f"{t}.weight"]
            for k, v in quantized_tensors(t, w, self.fmt).items():
                if k in keys:
                    out[k] = v
            del w
        return out


def resolve(files, cfg: dict, cfg_path: str, weights: str | None) -> tuple[Format | None, bool]:
    """-> ``(format or None, stored)`` of a part whose config is ``cfg``: stored quantised, quantised at load time
    (``weights``), or float (None); quantised tensors under a float config are refused."""
    stored = stored_format(cfg, cfg_path)
    if stored is None:
        hint = looks_quantized(files.keys())
        if hint is not None:
            raise CheckpointError(f"{files.folder}: tensor '{hint}' belongs to a quantised checkpoint, but {cfg_path} "
                                  f"records no {CONFIG_KEY}; the folder mixes a float config with quantised weights")
    check_requested(stored, weights, files.folder)
    name = stored or weights
    return (get(name) if name else None), stored is not None


def view(files, fmt: Format | None, stored: bool, targets: list[str], loads=None):
    """``files`` as the loader reads them for ``fmt`` (see :func:`resolve`): the quantised layers ``targets``
    (the names :func:`~uniar_backend.quant.layers.quantize_modules` replaced) checked as stored, or quantised as
    they are read; ``files`` itself for float weights.  ``loads``: the checkpoint keys the module loads (its
    parts), so a stored folder is checked only where this load reads it (see :class:`StoredView`)."""
    if fmt is None:
        return files
    return StoredView(files, fmt, targets, loads) if stored else ConvertingView(files, fmt, targets)
