"""ComfyUI's own multi-GPU support with the pack's models, in a real ComfyUI (CPU, loopback only).

ComfyUI 0.23+ (``comfy/multigpu.py``, ``comfy_extras/nodes_multigpu.py``) gives a model to another device by
rebuilding it through its patcher's ``cached_patcher_init`` factory: *MultiGPU CFG Split* (``MultiGPU_WorkUnits``)
makes one clone per extra GPU and runs the cond and uncond halves of each step on different devices in worker
threads; *Select Model Device* / *Select VAE Device* move a model to another GPU the same way; a dynamic-VRAM
patcher asked for a plain one (``clone(disable_dynamic=True)``) calls the factory with ``disable_dynamic=True``.

What a CPU can show, checked here on the fixture checkpoints:

* the patchers of the native route (``MODEL``, ``VAE``) and of UniAR Decode / Generate carry a factory of plain
  arguments, and a rebuild through it gives the same weights (bit for bit), plain ``ModelPatcher`` with
  ``disable_dynamic=True``;
* ``clone(disable_dynamic=True)`` -- on the patchers as they are, and on a patcher that says it is dynamic (what
  ComfyUI does with ``ModelPatcherDynamic``: a fresh plain patcher from the factory) -- and
  ``deepclone_multigpu``;
* core's whole multi-GPU path with the CPU seen as two devices (``cpu`` and ``cpu:0``, the same memory; the
  helper node file below makes ``comfy.model_management.get_all_torch_devices`` say so): MultiGPU CFG Split
  clones the DiT through the factory and samples with the cond / uncond halves on the two "devices" in core's
  worker threads; Select Model Device ``gpu:1`` and Select VAE Device ``gpu:1`` rebuild the DiT and the VAE for
  the second one; the pictures equal the plain KSampler's;
* the same with ComfyUI's layers built the way dynamic VRAM builds them (lazy weights, simulated on the CPU).

What only several GPUs show (speed, real placement, CUDA streams) is not tested here.  Runs only when
``COMFYUI_PATH`` is set and that ComfyUI has ``comfy/multigpu.py`` (0.23+)::

    COMFYUI_PATH=~/comfy33 COMFYUI_PYTHON=~/comfy33/venv/bin/python python -m pytest -q tests/test_comfyui_multigpu.py
"""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_server import SIM_DYNAMIC_VRAM, execution_error, live_server, skip_without_dynamic_vram  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
CKPT = "uniar-tiny-bsq64"

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH,
    reason="live ComfyUI tests need COMFYUI_PATH=<ComfyUI source tree> (and COMFYUI_PYTHON=<its interpreter>)",
)

# A custom-node file for these tests only (written into the server's custom_nodes/ by the fixture).
HELPER = r'''
"""Test helper of tests/test_comfyui_multigpu.py: the CPU as two devices for ComfyUI's multi-GPU code, a record
of what that code did, and three nodes: UniARTestPatcherProbe and UniARTestMultiGPUStats (report as JSON in their
UI output), UniARTestVAEToSecond (Select VAE Device's move to a GPU, onto the second device)."""
import copy
import json
import logging
import sys
import threading

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.multigpu

SECOND = torch.device("cpu", 0)  # != torch.device("cpu") for ComfyUI's bookkeeping; tensors land on the CPU
_real_devices = mm.get_all_torch_devices


def _two_devices(exclude_current=False):
    devices = [mm.get_torch_device(), SECOND]
    if exclude_current:
        devices = devices[1:]
    return devices


mm.get_all_torch_devices = _two_devices
logging.warning("uniar multigpu test helper: the CPU is seen as two devices, cpu and cpu:0")

# what the multi-GPU sampler's worker threads ran: device -> [work items, thread names]
_STATS = {}
_real_submit = comfy.multigpu.MultiGPUThreadPool.submit


def _submit(self, device, fn, *args, **kwargs):
    def run(*a, **k):
        entry = _STATS.setdefault(str(device), {"items": 0, "threads": []})
        entry["items"] += 1
        name = threading.current_thread().name
        if name not in entry["threads"]:
            entry["threads"].append(name)
        return fn(*a, **k)
    return _real_submit(self, device, run, *args, **kwargs)


comfy.multigpu.MultiGPUThreadPool.submit = _submit

# every deepclone_multigpu: the model, the device, the core function that asked, whether the model is a new one
_DEEPCLONES = []
_real_deepclone = comfy.model_patcher.ModelPatcher.deepclone_multigpu


def _deepclone(self, new_load_device=None, models_cache=None):
    caller = sys._getframe(1).f_code.co_name
    n = _real_deepclone(self, new_load_device=new_load_device, models_cache=models_cache)
    _DEEPCLONES.append({"model": type(self.model).__name__, "device": str(new_load_device), "caller": caller,
                        "new_model": n.model is not self.model, "load_device": str(n.load_device)})
    return n


comfy.model_patcher.ModelPatcher.deepclone_multigpu = _deepclone


class _SaysDynamic(comfy.model_patcher.ModelPatcher):
    """A plain patcher that answers is_dynamic() like ModelPatcherDynamic (which a CPU load device turns into a
    plain ModelPatcher): clone(disable_dynamic=True) then takes core's rebuild path."""

    def is_dynamic(self):
        return True


def _compare(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    same = sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu())
        for k in sa)
    return {"tensors": len(sa), "identical": bool(same), "shared": a is b}


def _factory(patcher):
    init = getattr(patcher, "cached_patcher_init", None)
    if init is None:
        return None
    fn, args = init[0], init[1]
    return {"function": f"{fn.__module__}.{fn.__qualname__}", "arg_types": [type(a).__name__ for a in args],
            "args": [a if isinstance(a, (str, int, float, type(None))) else list(a) for a in args],
            "length": len(init)}


def _probe(patcher):
    """The checks of one patcher; each rebuild is dropped before the next."""
    out = {"class": type(patcher).__name__, "model": type(patcher.model).__name__, "factory": _factory(patcher)}
    init = patcher.cached_patcher_init
    if init is None:
        return out
    fresh = init[0](*init[1])
    out["rebuild"] = dict(_compare(patcher.model, fresh.model), patcher=type(fresh).__name__,
                          same_factory=fresh.cached_patcher_init == init)
    del fresh
    plain = init[0](*init[1], disable_dynamic=True)
    out["rebuild_plain"] = dict(_compare(patcher.model, plain.model), patcher=type(plain).__name__,
                                exact_model_patcher=type(plain) is comfy.model_patcher.ModelPatcher)
    del plain
    c = patcher.clone(disable_dynamic=True)
    out["clone_disable_dynamic"] = dict(_compare(patcher.model, c.model), patcher=type(c).__name__)
    del c
    dyn = _SaysDynamic(patcher.model, patcher.load_device, patcher.offload_device)
    dyn.cached_patcher_init = init
    c = dyn.clone(disable_dynamic=True)
    out["dynamic_clone_disable_dynamic"] = dict(_compare(patcher.model, c.model), patcher=type(c).__name__,
                                                exact_model_patcher=type(c) is comfy.model_patcher.ModelPatcher,
                                                same_factory=c.cached_patcher_init == init)
    del c, dyn
    d = patcher.deepclone_multigpu(new_load_device=SECOND)
    out["deepclone_multigpu"] = dict(_compare(patcher.model, d.model), load_device=str(d.load_device),
                                     same_uuid=d.clone_base_uuid == patcher.clone_base_uuid)
    del d
    return out


def _slot_patchers():
    """The patchers UniAR Generate / Decode made (the pack's own model management)."""
    import sys

    found = {}
    for name, mod in list(sys.modules.items()):
        if name.endswith("nodes.model_management") and hasattr(mod, "_SLOTS") and hasattr(mod, "native_dit_patcher"):
            for slot in list(mod._SLOTS.values()):
                for part in ("ar", "dec"):
                    entry = getattr(slot, part, None)
                    if entry is not None:
                        found[part] = entry["patcher"]
    return found


class UniARTestPatcherProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "vae": ("VAE",), "after": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, model, vae, after):
        report = {"model": _probe(model), "vae": _probe(vae.patcher)}
        for part, patcher in _slot_patchers().items():
            report[part] = _probe(patcher)
        return {"ui": {"uniar_probe": [json.dumps(report)]}}


class UniARTestMultiGPUStats:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"after": ("IMAGE",)}, "optional": {"after2": ("IMAGE",), "after3": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def stats(self, after, after2=None, after3=None):
        report = {"workers": dict(_STATS), "devices": [str(d) for d in mm.get_all_torch_devices()],
                  "real_devices": [str(d) for d in _real_devices()],
                  "deepclones": [d for d in _DEEPCLONES if d["caller"] != "_probe"]}
        _STATS.clear()
        _DEEPCLONES.clear()
        return {"ui": {"uniar_probe": [json.dumps(report)]}}


class UniARTestVAEToSecond:
    """What Select VAE Device does for gpu:N (comfy_extras/nodes_multigpu.py SelectVAEDeviceNode.execute), with
    the second device as target: the node itself refuses any device of type cpu, which cpu:0 is."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "move"
    CATEGORY = "testing"

    def move(self, vae):
        import comfy_extras.nodes_multigpu as core

        vae = copy.copy(vae)
        vae.patcher = vae.patcher.clone()
        vae._select_base_device = vae.device
        vae.patcher = core._retarget_patcher(vae.patcher, SECOND, mm.vae_offload_device())
        vae.first_stage_model = vae.patcher.model
        vae.device = SECOND
        return (vae,)


class UniARTestFlashAttentionDiT:
    """A fresh copy of the UniAR DiT (through its factory) set to flash attention, as the factory builds it for a
    CUDA loader device when flash-attn is installed; sampled here on the CPU (Select Model Device cpu)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, model):
        m = model.clone(force_deepcopy=True)
        assert m.model is not model.model
        m.model.diffusion_model.dit.attention = "flash_attention_2"
        return (m,)


NODE_CLASS_MAPPINGS = {"UniARTestPatcherProbe": UniARTestPatcherProbe,
                       "UniARTestMultiGPUStats": UniARTestMultiGPUStats,
                       "UniARTestVAEToSecond": UniARTestVAEToSecond,
                       "UniARTestFlashAttentionDiT": UniARTestFlashAttentionDiT}
'''


def _skip_without_multigpu() -> None:
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "multigpu.py")):
        pytest.skip("this ComfyUI release has no multi-GPU support (comfy/multigpu.py appeared in 0.23)")


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    path = tmp_path_factory.mktemp("multigpu") / "uniar_test_multigpu.py"
    path.write_text(HELPER, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def server(helper):
    _skip_without_multigpu()
    yield from live_server(COMFYUI_PATH, COMFYUI_PYTHON, [helper])


@pytest.fixture(scope="module")
def dynamic_vram_server(helper):
    _skip_without_multigpu()
    skip_without_dynamic_vram(COMFYUI_PATH)
    yield from live_server(COMFYUI_PATH, COMFYUI_PYTHON, [helper, SIM_DYNAMIC_VRAM])


# ------------------------------------------------------------------------------------------------ graphs
STEPS = 4


def graph(cfg: float = 1.5) -> dict:
    """Tokens -> the native route; KSampler + VAE Decode on: the plain MODEL and VAE (``b``); MultiGPU CFG Split's
    MODEL (``m``); Select Model Device gpu:1 then default -- cpu:0 is of type cpu, so gpu:1 only retargets, and
    default brings the model back to the loader's device through a rebuild, the path a real gpu:N takes -- with
    the VAE moved to the second device as Select VAE Device moves it to a GPU (``s``); Select Model Device cpu
    (``c``).  UniAR Decode (``d``) for the probe."""
    g = {"1": {"class_type": "UniARModelLoader",
               "inputs": {"ckpt_name": CKPT, "dtype": "auto", "attention": "auto", "weights": "as stored"}},
         "2": {"class_type": "UniARGenerate",
               "inputs": {"model": ["1", 0], "prompt": "A red cube on a blue table.",
                          "aspect_ratio": "custom (width x height)", "width": 64, "height": 64, "cfg": 1.5,
                          "temperature": 1.0, "seed": 7, "batch_size": 1, "mode": "fast"}},
         "3": {"class_type": "UniARDecoderLoader", "inputs": {"model": ["1", 0]}},
         "4": {"class_type": "UniARTokensToConditioning", "inputs": {"model": ["1", 0], "tokens": ["2", 0]}},
         "5": {"class_type": "UniAREmptyLatent", "inputs": {"tokens": ["2", 0], "upsampling_ratio": 1.0}},
         "mg": {"class_type": "MultiGPU_WorkUnits", "inputs": {"model": ["3", 0], "max_gpus": 2}},
         "sm1": {"class_type": "SelectModelDevice", "inputs": {"model": ["3", 0], "device": "gpu:1"}},
         "sm": {"class_type": "SelectModelDevice", "inputs": {"model": ["sm1", 0], "device": "default"}},
         "sv": {"class_type": "UniARTestVAEToSecond", "inputs": {"vae": ["3", 1]}},
         "cm": {"class_type": "SelectModelDevice", "inputs": {"model": ["3", 0], "device": "cpu"}},
         "d": {"class_type": "UniARDecode", "inputs": {
             "model": ["1", 0], "tokens": ["2", 0], "steps": 2, "guidance": 1.5, "upsampling_ratio": 1.0,
             "seed": 1, "decoder_prompt": ""}}}
    for name, model, vae in (("b", "3", "3"), ("m", "mg", "3"), ("s", "sm", "sv"), ("c", "cm", "3")):
        g[f"k{name}"] = {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "seed": 3, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["5", 0],
            "denoise": 1.0}}
        g[f"v{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"k{name}", 0],
                                                               "vae": [vae, 1 if vae == "3" else 0]}}
        g[f"o{name}"] = {"class_type": "SaveImage", "inputs": {"images": [f"v{name}", 0],
                                                               "filename_prefix": f"uniar/mg_{name}"}}
    g["stats"] = {"class_type": "UniARTestMultiGPUStats",
                  "inputs": {"after": ["vm", 0], "after2": ["vs", 0], "after3": ["vc", 0]}}
    return g


def run_ok(server, g: dict, timeout: float = 600) -> dict:
    entry = server.run(g, timeout=timeout)
    assert entry.get("status", {}).get("status_str") == "success", f"{execution_error(entry)}\n{server.log_tail()}"
    return entry


def probe_report(entry: dict, node: str) -> dict:
    return json.loads(entry["outputs"][node]["uniar_probe"][0])


def image(server, entry: dict, node: str):
    import numpy as np
    from PIL import Image

    (item,) = entry["outputs"][node]["images"]
    return np.asarray(Image.open(io.BytesIO(server.view(item))).convert("RGB")).astype(np.int16)


# ------------------------------------------------------------------------------------------------ checks
def check_patcher(rep: dict, factory: str, nargs: int) -> None:
    f = rep["factory"]
    assert f is not None, f"{rep['model']}: no cached_patcher_init"
    assert f["function"].endswith("nodes.model_management." + factory), f
    assert f["length"] == 2 and len(f["args"]) == nargs, f
    assert set(f["arg_types"]) <= {"str", "NoneType", "tuple"}, f  # plain, cheap to store
    assert os.path.basename(f["args"][0]) == CKPT, f
    for key in ("rebuild", "rebuild_plain", "dynamic_clone_disable_dynamic", "deepclone_multigpu"):
        r = rep[key]
        assert r["tensors"] > 0 and r["identical"] and not r["shared"], (key, r)
    assert rep["rebuild"]["same_factory"], rep["rebuild"]
    assert rep["rebuild_plain"]["exact_model_patcher"], rep["rebuild_plain"]
    dyn = rep["dynamic_clone_disable_dynamic"]
    assert dyn["exact_model_patcher"] and dyn["same_factory"], dyn
    # a plain patcher's clone(disable_dynamic=True) is an ordinary clone: the same model
    assert rep["clone_disable_dynamic"]["identical"] and rep["clone_disable_dynamic"]["shared"], rep
    assert rep["deepclone_multigpu"]["load_device"] == "cpu:0" and rep["deepclone_multigpu"]["same_uuid"], rep


def check_patchers(entry: dict) -> dict:
    rep = probe_report(entry, "probe")
    assert rep["model"]["model"] == "UniARDiTModel", rep["model"]
    check_patcher(rep["model"], "native_dit_patcher", 4)
    check_patcher(rep["vae"], "native_vae_patcher", 3)
    assert rep["ar"]["model"] == "UniARAutoregressive" and rep["dec"]["model"] == "UniARImageDecoder", rep.keys()
    check_patcher(rep["ar"], "ar_patcher", 5)
    assert {"llm", "gen_head"} <= set(rep["ar"]["factory"]["args"][2]), rep["ar"]["factory"]  # what Generate loaded
    check_patcher(rep["dec"], "decoder_patcher", 4)
    return rep


def check_multigpu_run(server, entry: dict) -> None:
    b = image(server, entry, "ob")
    # the DiT and the VAE rebuilt through their factories (Select Model Device, Select VAE Device's move), and
    # Select Model Device cpu: the same computation on the same weights
    assert int(abs(image(server, entry, "os") - b).max()) == 0
    assert int(abs(image(server, entry, "oc") - b).max()) == 0
    # MultiGPU CFG Split: cond and uncond computed separately (batch 1 each, not one batch of 2)
    assert int(abs(image(server, entry, "om") - b).max()) <= 1
    stats = probe_report(entry, "stats")
    assert stats["devices"] == ["cpu", "cpu:0"] and stats["real_devices"] == ["cpu"], stats
    workers = stats["workers"]
    # each step: the cond on one device, the uncond on the other, in core's worker threads
    assert set(workers) == {"cpu", "cpu:0"}, workers
    for dev, w in workers.items():
        assert w["items"] == STEPS, (dev, w)
    # the models core rebuilt through the factories, and who asked
    made = sorted((d["model"], d["device"], d["caller"]) for d in stats["deepclones"])
    assert made == [("UniARDiTModel", "cpu", "_retarget_patcher"),  # Select Model Device default
                    ("UniARDiTModel", "cpu:0", "create_multigpu_deepclones"),  # MultiGPU CFG Split
                    ("UniARVAEModel", "cpu:0", "_retarget_patcher")], stats["deepclones"]  # the VAE's move
    for d in stats["deepclones"]:
        assert d["new_model"] and d["load_device"] == d["device"], d
    log = server.log_text()
    assert "No extra torch devices" not in log
    assert "cannot retarget" not in log, "Select Model / VAE Device fell back to passing the model through"


def full_graph() -> dict:
    """:func:`graph` + the probe of the patchers, after UniAR Decode (so the AR and decoder patchers exist), and
    KSampler on a copy of the DiT set to flash attention (``f``, run on the CPU: falls back to sdpa)."""
    g = graph()
    g["probe"] = {"class_type": "UniARTestPatcherProbe", "inputs": {"model": ["3", 0], "vae": ["3", 1],
                                                                   "after": ["d", 0]}}
    g["fa"] = {"class_type": "UniARTestFlashAttentionDiT", "inputs": {"model": ["3", 0]}}
    g["kf"] = dict(g["kb"], inputs=dict(g["kb"]["inputs"], model=["fa", 0]))
    g["vf"] = {"class_type": "VAEDecode", "inputs": {"samples": ["kf", 0], "vae": ["3", 1]}}
    g["of"] = {"class_type": "SaveImage", "inputs": {"images": ["vf", 0], "filename_prefix": "uniar/mg_f"}}
    return g


# ------------------------------------------------------------------------------------------------ tests
def test_native_route_with_multigpu_nodes(server):
    """The factories, clones and rebuilds of every pack patcher; MultiGPU CFG Split, Select Model Device and
    Select VAE Device on the native route give the plain KSampler's picture."""
    entry = run_ok(server, full_graph())
    check_patchers(entry)
    check_multigpu_run(server, entry)
    # a DiT built for flash attention (a CUDA loader device) sampled on the CPU: sdpa, the same picture
    assert int(abs(image(server, entry, "of") - image(server, entry, "ob")).max()) == 0


def test_cfg_one_leaves_the_split_idle(server):
    """At cfg 1 there is one cond per step: MultiGPU CFG Split runs it on one device, the picture is the same."""
    g = graph(cfg=1.0)
    entry = run_ok(server, g)
    b = image(server, entry, "ob")
    assert int(abs(image(server, entry, "om") - b).max()) <= 1
    workers = probe_report(entry, "stats")["workers"]
    assert sum(w["items"] for w in workers.values()) == STEPS, workers


def test_with_dynamic_vram_layers(dynamic_vram_server):
    """The same with comfy.ops layers built as under dynamic VRAM (lazy weights): rebuilds fill them the same."""
    srv = dynamic_vram_server
    entry = run_ok(srv, full_graph())
    check_patchers(entry)
    check_multigpu_run(srv, entry)
    assert "into lazily created layers" in srv.log_text(), "the layers were not lazy: the simulation had no effect"
