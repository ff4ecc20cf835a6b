"""``python -m uniar_backend quantize --model SRC --format {int8,fp8,int4} --out DST``: a complete checkpoint
folder in the same layout with the AR model's and the DiT's target Linears stored in the format.

* one tensor at a time: each output shard's header is computed from the source header first, then every tensor
  is read, quantised if it is a target and written, so host memory stays around one (float32 copy of a) tensor;
* atomic: everything is written into ``DST.partial-*`` beside DST and renamed to DST at the end, only after the
  copy was checked complete (every file of SRC there, copies of their size, the weight files readable); an error,
  Ctrl-C or SIGTERM (the CLI turns it into an exception) removes it, and the partial folders of a run that was
  killed outright (SIGKILL, power loss: their process is gone) are removed by the next run for the same DST;
  DST must not exist yet (or be an empty folder), must not be a symbolic link, and may not lie inside SRC (or
  SRC in DST);
* the rest of the folder (tokenizer files, bsq_encoder/, the VAE, the schedule, ...) is copied as it is, linked
  sub-folders included (a ``sd3_pipeline/`` shared between SFT and RL by a link is followed, each real folder
  once); hidden folders (download staging, caches) are left out.  The format is recorded in ``config.json`` /
  ``sd3_transformer/config.json`` (``uniar_quantization``) and in each converted file's metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..checkpoint import WeightFiles, write_safetensors_streaming
from ..config import read_json
from ..errors import CheckpointError, InputError
from ..fileio import PARTIAL
from .files import ConvertingView, record
from .formats import Format, check_device, get
from .layers import AR_TARGETS, DIT_TARGETS, targets

MARGIN = 1 << 30


def _ar_targets(ck, fmt: Format) -> list[str]:
    from ..checkpoint import build_on_meta
    from ..modeling.uniar import COMPONENTS, UniARModel

    comps = tuple(c for c in COMPONENTS if c != "gen_head" or ck.config.can_generate)
    model, _ = build_on_meta(lambda o: UniARModel(ck.config, comps, ops=o))
    return targets(model, AR_TARGETS, fmt)


def _dit_targets(root: str, fmt: Format) -> list[str]:
    from ..decoder.components import read_transformer_config
    from ..decoder.sd3 import UniARSD3Transformer

    cfg = read_transformer_config(root)
    with torch.device("meta"):
        return targets(UniARSD3Transformer.from_uniar_config(cfg), DIT_TARGETS, fmt)


OWNER = ".uniar_partial_owner"  # inside it: "<pid> <host>" of the process writing it


def _source_files(src: str) -> dict[str, str]:
    """Relative path (``/``-separated) -> path of every file of the source checkpoint, linked folders followed
    (each real folder once), hidden folders left out."""
    from ..fileio import walk_folders

    out = {}
    for folder, _, names in walk_folders(src):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                out[os.path.relpath(path, src).replace(os.sep, "/")] = path
    return out


def _check_paths(src: str, dst: str) -> None:
    if os.path.islink(dst):
        raise InputError(f"--out {dst} is a symbolic link (to {os.readlink(dst)!r}); give the path of a new folder "
                         "(the converter creates it and renames it into place when complete)")
    if os.path.exists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise InputError(f"--out {dst} already exists; give a new folder (the converter never overwrites a "
                         "checkpoint)")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
        raise InputError(f"--out {dst} lies inside --model {src} (or the other way round); write the converted "
                         "checkpoint to a folder of its own")


def _partial_owner_alive(folder: str) -> bool:
    """Whether the process that owns the partial ``folder`` still runs (True when unknown: never remove what a
    live run, or a run on another machine sharing the disk, is writing)."""
    import socket

    try:
        with open(os.path.join(folder, OWNER), encoding="utf-8") as f:
            pid, host = f.read(200).split()
        pid = int(pid)
    except (OSError, ValueError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_partials(dst: str) -> list[str]:
    """Remove ``DST.partial-*`` folders left by a conversion to ``dst`` whose process is gone; -> their paths."""
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        p = os.path.join(parent, name)
        if name.startswith(base + PARTIAL) and os.path.isdir(p) and not os.path.islink(p) \
                and not _partial_owner_alive(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _check_complete(tmp: str, files: dict[str, str], weight_files: set[str]) -> None:
    """Before the rename: every source file is in ``tmp``, the copies of their size, the converted weight files
    readable safetensors (their headers are checked against their sizes)."""
    from ..checkpoint import read_header

    for rel, path in files.items():
        out = os.path.join(tmp, *rel.split("/"))
        if not os.path.isfile(out):
            raise CheckpointError(f"the converted checkpoint lacks {rel} (of {path}); nothing was written to --out")
        if path in weight_files:
            read_header(out, fix="the conversion failed; nothing was written to --out")
        elif not rel.endswith(".safetensors.index.json") and rel not in ("config.json", "sd3_transformer/config.json") \
                and os.path.getsize(out) != os.path.getsize(path):
            raise CheckpointError(f"the copy of {path} is incomplete; nothing was written to --out")


class _Plan:
    """One weight part to convert: its files, seen quantised (with the ``comfy_quant`` marks) through the same
    view the loader uses for load-time quantisation."""

    def __init__(self, folder: str, base: str, fmt: Format, targets_: list[str]):
        self.folder, self.base = folder, base
        self.files = WeightFiles(folder, base)
        self.view = ConvertingView(self.files, fmt, targets_, marks=True)

    def out_spec(self, path: str) -> dict:
        """``{key: (dtype, shape)}`` of the converted file made from ``path``."""
        out = {}
        for k, p in self.view.key_to_file.items():
            if p == path:
                shape, dt = self.view.info(k)
                out[k] = (dt, tuple(shape))
        return out


def convert(src: str, fmt_name: str, dst: str, progress=None) -> dict:
    """Convert the float checkpoint folder ``src`` to ``fmt_name`` in the new folder ``dst``.  -> summary dict."""
    from ..loader import Checkpoint

    fmt = get(fmt_name)
    check_device(fmt, torch.device("cpu"))
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    ck = Checkpoint(src)
    if ck.weight_format is not None:
        raise InputError(f"{src} is already stored in {ck.weight_format}; convert the float (bf16) checkpoint "
                         "instead (quantising twice loses precision)")
    _check_paths(src, dst)
    plans = [_Plan(src, "model", fmt, _ar_targets(ck, fmt))]
    dit = os.path.join(src, "sd3_transformer")
    if os.path.isdir(dit):
        plans.append(_Plan(dit, "diffusion_pytorch_model", fmt, _dit_targets(src, fmt)))
    weight_files = {p for plan in plans for p in plan.files.headers}
    files = _source_files(src)
    files.update({os.path.relpath(p, src).replace(os.sep, "/"): p for p in weight_files})
    # refuse before writing anything: the disk must hold the copy (at most the source's size)
    total = sum(os.path.getsize(p) for p in files.values())
    probe = os.path.dirname(dst)
    if os.path.isdir(probe) and shutil.disk_usage(probe).free < total + MARGIN:
        raise CheckpointError(f"not enough disk space in {probe}: the converted checkpoint needs up to "
                              f"{total / 1e9:.1f} GB (plus 1 GB to spare), {shutil.disk_usage(probe).free / 1e9:.1f} "
                              "GB are free")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    remove_stale_partials(dst)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + PARTIAL, dir=os.path.dirname(dst))
    done, layers = 0, 0
    try:
        import socket

        with open(os.path.join(tmp, OWNER), "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        for plan in plans:
            new_map = {}
            for path in sorted(plan.files.headers):
                out = os.path.join(tmp, os.path.relpath(path, src))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                spec = plan.out_spec(path)
                layers += sum(1 for k in spec if k.endswith(".comfy_quant"))
                write_safetensors_streaming(out, spec, plan.view.read, {
                    "format": "pt", "uniar_quantization": fmt.name})
                new_map.update({k: os.path.basename(path) for k in spec})
                done += os.path.getsize(path)
                if progress:
                    progress(done, total)
            index = os.path.join(plan.folder, f"{plan.base}.safetensors.index.json")
            if os.path.isfile(index):
                sizes = sum(os.path.getsize(os.path.join(tmp, os.path.relpath(p, src))) for p in plan.files.headers)
                with open(os.path.join(tmp, os.path.relpath(index, src)), "w", encoding="utf-8") as f:
                    json.dump({"metadata": {"total_size": sizes, "uniar_quantization": fmt.name},
                               "weight_map": dict(sorted(new_map.items()))}, f, indent=2)
        configs = {os.path.join(src, "config.json"), os.path.join(dit, "config.json")}
        for rel, path in sorted(files.items()):
            out = os.path.join(tmp, *rel.split("/"))
            if path in weight_files or path.endswith(".safetensors.index.json") and os.path.exists(out):
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if path in configs:
                with open(out, "w", encoding="utf-8") as f:
                    json.dump(record(read_json(path), fmt), f, indent=2)
            else:
                shutil.copy2(path, out)
            done += os.path.getsize(path)
            if progress:
                progress(done, total)
        if progress:
            progress(total, total)  # the rewritten shard indexes are not copied byte for byte
        _check_complete(tmp, files, weight_files)
        os.unlink(os.path.join(tmp, OWNER))
        if os.path.isdir(dst):
            os.rmdir(dst)  # the empty folder the user made
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": fmt.name, "layers": layers, "source_bytes": total,
            "bytes": sum(os.path.getsize(p) for p in _source_files(dst).values())}
