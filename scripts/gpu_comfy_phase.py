"""The ComfyUI phase of the one-command GPU check: the README's VRAM budget claims measured inside ComfyUI.

    python scripts/gpu_comfy_phase.py --comfyui PATH --out DIR --budgets 8,12 [--cpu-dry-run]

Run it with ComfyUI's interpreter (``COMFYUI_PYTHON``); ``uniar_backend.tools.gpu_check.comfyui`` does.  The LAST
line of stdout is one JSON object ``{"status": "ok"|"failed", "comfyui_version", "runs": [...], ...}``; the exit
status is 0 only when every run is ok.  One run per budget (8 GB -> int4, 12 GB -> int8, other budgets: int4 below
12 GB, int8 from 12 GB):

1. a checkpoint in the budget's format: on a GPU a REAL-SIZE random checkpoint (Qwen3-VL-8B text + SigLIP2
   vision + the 4-level BSQ head; the SD3.5-Medium DiT; the SD3 VAE), each tensor drawn on the GPU directly in its
   stored form (int codes, scales, bf16) and streamed to disk with ``write_safetensors_streaming`` in the layout
   the loader itself builds (``build_on_meta`` + ``quantize_modules``), written in a child process so its CUDA
   context is gone before ComfyUI starts.  No text encoders: the decoder prompt's embeddings are put into the
   checkpoint's decoder-prompt cache (``.uniar_cache``, random values of the right shapes), which is the loader's
   documented path when ``sd3_pipeline/text_encoder*`` are absent.  ``--cpu-dry-run``: the tiny fixture
   ``uniar-tiny`` converted with the pack's own converter (``uniar_backend.quant.convert``).
2. ComfyUI (``tests/comfyui_server.py``'s ``ComfyServer``) told to use only B GB: ``--reserve-vram (total - B)``
   (ComfyUI 0.33 hands it to comfy-aimdo as its headroom too); ``--cpu`` plus the simulated dynamic-VRAM custom
   node in the dry run.
3. the text-to-image API workflow (GPU: AR 512x512, upsampling ratio 2 -> 1024x1024; CPU: 64x64), timed, with the
   server's peak memory polled every 0.2 s in a thread (GPU: ``nvidia-smi --query-compute-apps`` for the server's
   pid; CPU: its resident set size, ``"memory": "rss"``, budgets not enforced: ``"under_budget": null``);
4. a second model beside the first: the caption workflow on a second name of the same checkpoint folder (a link:
   a separate model slot, so a second AR model is loaded while the first model and the decoder stay registered):
   it must complete without an out-of-memory error (ComfyUI has to evict).

``--write-real-size DIR --format F [--shrink K] [--device D]`` only writes a random checkpoint (tests use it
with a shrink factor on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(1, TESTS)

GPU_TIME_BUDGET = 200.0  # seconds for the whole GPU phase (gpu_check gives the phase 240 s)
GIB = 2**30
# The fixture tokenizer's special token ids (copied with its files into a real-size checkpoint; the real
# vocabulary is larger, so these ids are valid rows of the real embedding table).
FIXTURE_TOKEN_IDS = {"image_token_id": 650, "video_token_id": 651, "vision_start_token_id": 647,
                     "vision_end_token_id": 648}


def budget_format(budget_gb: float) -> str:
    return "int8" if budget_gb >= 12 else "int4"


def log(msg: str) -> None:
    print(f"[gpu_comfy_phase] {msg}", file=sys.stderr, flush=True)


# ============================================================================================ real-size writer
def real_ar_config(shrink: int = 1) -> dict:
    """``synthetic.real_config()``'s raw dict (shrunk by ``shrink`` like the benchmark's ``--shrink``), with the
    fixture tokenizer's special token ids."""
    import copy

    from uniar_backend.tools import synthetic

    if shrink > 1:
        k = shrink
        d = synthetic.config_dict(hidden=4096 // k, layers=max(2, 36 // k), stack_depth=4, heads=max(2, 32 // k),
                                  kv_heads=max(1, 8 // k), head_dim=128, intermediate=12288 // k, vocab=4096,
                                  bsq_dim=64, mrope_section=[24, 20, 20], dtype="bfloat16",
                                  vision={"hidden_size": 1152 // k, "num_heads": 2, "intermediate_size": 4304 // k,
                                          "depth": 4, "deepstack_visual_indexes": [0, 1, 2],
                                          "bsq_hidden_dim": 8192 // k, "out_hidden_size": 4096 // k})
    else:
        d = copy.deepcopy(synthetic.real_config().raw)
    d.update(FIXTURE_TOKEN_IDS)
    return d


def real_decoder_configs(shrink: int = 1, vision_hidden: int = 1152, levels: int = 4) -> tuple[dict, dict]:
    """(sd3_transformer config.json, sd3_pipeline/vae config.json) at SD3.5-Medium sizes (``decoder/memory.py``)."""
    from uniar_backend.decoder.memory import SD35M_TRANSFORMER, SD3_VAE

    t = dict(SD35M_TRANSFORMER)
    v = dict(SD3_VAE)
    if shrink > 1:
        k = shrink
        t.update(num_layers=max(2, 24 // k), num_attention_heads=max(2, 24 // k), joint_attention_dim=4096 // k,
                 pooled_projection_dim=2048 // k, dual_attention_layers=[0])
        t["caption_projection_dim"] = t["num_attention_heads"] * t["attention_head_dim"]
        v.update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, layers_per_block=1)
    t["siglip_channels"] = levels * vision_hidden
    t.update({"_class_name": "SD3Transformer2DModelWithSigLIP", "_diffusers_version": "0.37.1",
              "add_siglip_tensor_to_latent": True, "upscale_factor": 2, "drop_image_token_prob_for_cfg": 0.1})
    v.update({"_class_name": "AutoencoderKL", "_diffusers_version": "0.37.1", "force_upcast": True,
              "sample_size": 1024, "latents_mean": None, "latents_std": None})
    return t, v


SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.37.1",
             "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
             "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
             "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
             "use_dynamic_shifting": False, "use_exponential_sigmas": False, "use_karras_sigmas": False}


class _Maker:
    """Produces the stored tensors of one weight file on ``device``: float tensors in bf16 scaled like
    ``synthetic.fill_random``, quantised layers directly as codes + scales (values of the same spread), the
    ``comfy_quant`` markers, the BSQ buffers."""

    def __init__(self, spec: dict, fmt, device, seed: int, gain4=frozenset(), fixed: dict | None = None):
        self.spec, self.fmt, self.device, self.seed = spec, fmt, device, seed
        self.gain4 = gain4
        self.fixed = fixed or {}

    def _gen(self, key):
        import torch

        from uniar_backend.tools.synthetic import _key_seed

        g = torch.Generator(device=self.device)
        g.manual_seed(_key_seed(self.seed, key))
        return g

    def make(self, key: str):
        import torch

        from uniar_backend.quant.formats import comfy_quant_tensor
        from uniar_backend.tools.synthetic import _init_spec

        dt, shape = self.spec[key]
        if key in self.fixed:
            return self.fixed[key]
        if key.endswith(".comfy_quant"):
            return comfy_quant_tensor(self.fmt)
        stem, _, last = key.rpartition(".")
        quant = self.fmt is not None and f"{stem}.comfy_quant" in self.spec
        g = self._gen(key)
        dev = self.device
        if quant:
            if last == "weight":  # the codes: uniform over the format's range
                return torch.randint(-128 if self.fmt.name == "int4" else -127, 128, tuple(shape), generator=g,
                                     device=dev, dtype=torch.int8)
            wshape = self.spec[f"{stem}.weight"][1]
            k_in = wshape[1] * (2 if self.fmt.name == "int4" else 1)
            std = 1.0 / (k_in ** 0.5)
            if self.fmt.name == "int8" and last == "weight_scale":
                return torch.full(tuple(shape), std / 73.3, device=dev, dtype=dt)  # std of U(-127, 127) = 73.3
            if self.fmt.name == "int4" and last == "weight_scale":
                return torch.full(tuple(shape), std / 4.6, device=dev, dtype=dt)  # std of U(0, 15) - 8 = 4.6
            if self.fmt.name == "int4" and last == "weight_zeros":
                return torch.full(tuple(shape), 0.5 * std / 4.6, device=dev, dtype=dt)  # centre (q - 8) on 0
            if self.fmt.name == "fp8" and last == "weight_scale":
                return torch.tensor(std / 2.0, device=dev, dtype=dt)
        if not dt.is_floating_point:
            return torch.zeros(tuple(shape), dtype=dt, device=dev)
        _, mean, std = _init_spec(key, tuple(shape), self.gain4)
        if dt.itemsize == 1:  # fp8 codes
            return torch.randn(tuple(shape), generator=g, device=dev).clamp_(-3, 3).to(dt)
        return torch.empty(tuple(shape), device=dev, dtype=dt).normal_(mean, std, generator=g)

    def __call__(self, names):
        return {n: self.make(n) for n in names}


def _layout_spec(layout: dict, key_map, targets: list[str], fmt, float_dtype) -> dict:
    """``{checkpoint key: (dtype, shape)}`` of a file holding a module's layout: quantised tensors in their stored
    dtype, other floats in ``float_dtype``, plus a ``comfy_quant`` marker per quantised layer."""
    import torch

    from uniar_backend.quant.formats import comfy_quant_tensor

    spec = {}
    for k, t in layout.items():
        dt = t.dtype if getattr(t, "uniar_stored", False) or not t.is_floating_point() else float_dtype
        spec[key_map(k)] = (dt, tuple(t.shape))
    if fmt is not None:
        cq = comfy_quant_tensor(fmt)
        for name in targets:
            spec[key_map(name + ".weight").rsplit(".", 1)[0] + ".comfy_quant"] = (torch.uint8, tuple(cq.shape))
    return spec


def write_real_size(folder: str, fmt_name: str | None, device: str = "cuda", shrink: int = 1, seed: int = 0,
                    prompt_dtype: str = "bfloat16", source: str | None = None) -> dict:
    """Write a complete random UniAR checkpoint (AR model, bsq_encoder/, sd3_transformer/, sd3_pipeline/ with
    the VAE and the schedule, the decoder-prompt cache) in ``fmt_name`` ("int4" / "int8" / "fp8" / None for
    bf16) at the real sizes (``shrink`` divides widths and depths).  -> {"seconds", "bytes", ...}."""
    import torch

    from uniar_backend.checkpoint import build_on_meta, write_safetensors_streaming
    from uniar_backend.config import VisionConfig
    from uniar_backend.decoder.prompt import DEFAULT_DECODER_PROMPT, PromptEmbeddings, cache_file_name, write_cache
    from uniar_backend.decoder.sd3 import UniARSD3Transformer
    from uniar_backend.decoder.vae import VAEDecoder, VAEEncoder
    from uniar_backend.modeling.uniar import COMPONENTS, UniARModel
    from uniar_backend.quant.files import record
    from uniar_backend.quant.formats import get
    from uniar_backend.quant.layers import AR_TARGETS, DIT_TARGETS, quantize_modules
    from uniar_backend.tools import synthetic

    t0 = time.monotonic()
    dev = torch.device(device)
    fmt = get(fmt_name) if fmt_name not in (None, "bf16") else None
    bf16 = torch.bfloat16
    source = source or os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "uniar-tiny")
    os.makedirs(folder, exist_ok=True)
    meta = {"format": "pt", "uniar_synthetic": "random weights, real sizes" + (f" / {shrink}" if shrink > 1 else "")}
    if fmt is not None:
        meta["uniar_quantization"] = fmt.name
    written = 0

    # ---- AR model (config.json as the converter records it)
    raw = real_ar_config(shrink)
    cfg = synthetic.config_from_dict(raw)
    comps = tuple(c for c in COMPONENTS if c != "gen_head" or cfg.can_generate)
    quantized: list[str] = []

    def q_ar(m, twin):
        quantized[:] = quantize_modules(m, AR_TARGETS, fmt, bf16, like=twin)

    model, layout = build_on_meta(lambda o: UniARModel(cfg, comps, ops=o, dtype=bf16), None,
                                  post=q_ar if fmt is not None else None)
    spec = _layout_spec(layout, model.checkpoint_key, quantized, fmt, bf16)
    fixed = {f"model.visual.{k}": v for k, v in synthetic._buffers(cfg, "cpu").items()}
    spec.update({k: (v.dtype, tuple(v.shape)) for k, v in fixed.items()})
    gain4 = {"lm_head.weight"}
    v = model.output_layer_vistok.variant if model.output_layer_vistok is not None else None
    if v:
        gain4.add({"linear": "output_layer_vistok.weight", "layernorm": "output_layer_vistok.1.weight",
                   "mlp": "output_layer_vistok.3.weight"}[v])
    maker = _Maker(spec, fmt, dev, seed, frozenset(gain4), fixed)
    written += write_safetensors_streaming(os.path.join(folder, "model.safetensors"), spec, maker, meta)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(record(raw, fmt) if fmt is not None else raw, f, indent=2)
    synthetic.copy_side_files(source, folder)

    # ---- bsq_encoder/: the vision tower alone (the AR file's model.visual.* tensors, same values)
    enc = synthetic.write_bsq_encoder_config(folder, raw)
    pre = "model.visual."
    vspec = {k[len(pre):]: s for k, s in spec.items() if k.startswith(pre)}
    written += write_safetensors_streaming(
        os.path.join(enc, "model.safetensors"), vspec,
        lambda names: {n: maker.make(pre + n) for n in names}, {"format": "pt"})
    del model, layout, spec, vspec

    # ---- DiT
    vision = VisionConfig.from_dict(dict(raw["vision_config"]), "bsq_encoder/config.json")
    tcfg, vae_cfg = real_decoder_configs(shrink, vision.hidden_size, vision.levels)
    tdir = os.path.join(folder, "sd3_transformer")
    os.makedirs(tdir, exist_ok=True)
    dq: list[str] = []

    def q_dit(m, twin):
        dq[:] = quantize_modules(m, DIT_TARGETS, fmt, bf16, like=twin)

    _, tlayout = build_on_meta(lambda o: UniARSD3Transformer(tcfg, o), None, post=q_dit if fmt is not None else None)
    tspec = _layout_spec(tlayout, lambda k: k, dq, fmt, bf16)
    written += write_safetensors_streaming(os.path.join(tdir, "diffusion_pytorch_model.safetensors"), tspec,
                                           _Maker(tspec, fmt, dev, seed + 1), meta)
    with open(os.path.join(tdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(record(tcfg, fmt) if fmt is not None else tcfg, f, indent=2)

    # ---- VAE (both halves) and the schedule
    vdir = os.path.join(folder, "sd3_pipeline", "vae")
    os.makedirs(vdir, exist_ok=True)
    _, dl = build_on_meta(lambda o: VAEDecoder(vae_cfg, o))
    _, el = build_on_meta(lambda o: VAEEncoder(vae_cfg, o))
    vspec = _layout_spec({**dl, **el}, lambda k: k, [], None, bf16)
    written += write_safetensors_streaming(os.path.join(vdir, "diffusion_pytorch_model.safetensors"), vspec,
                                           _Maker(vspec, None, dev, seed + 2), {"format": "pt"})
    with open(os.path.join(vdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(vae_cfg, f, indent=2)
    sdir = os.path.join(folder, "sd3_pipeline", "scheduler")
    os.makedirs(sdir, exist_ok=True)
    with open(os.path.join(sdir, "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SCHEDULER, f, indent=2)
    with open(os.path.join(folder, "sd3_pipeline", "model_index.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.37.1",
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
                  f, indent=2)

    # ---- decoder prompt: no text encoders; their output cached (random, the right widths)
    pdt = getattr(torch, prompt_dtype)
    g = torch.Generator().manual_seed(seed + 3)
    emb = PromptEmbeddings(DEFAULT_DECODER_PROMPT,
                           torch.randn(1, 77 + 256, tcfg["joint_attention_dim"], generator=g).to(pdt),
                           torch.randn(1, tcfg["pooled_projection_dim"], generator=g).to(pdt))
    cache = os.path.join(folder, ".uniar_cache")
    os.makedirs(cache, exist_ok=True)
    fp = "synthetic-no-text-encoders"
    write_cache(os.path.join(cache, cache_file_name(DEFAULT_DECODER_PROMPT, pdt, fp)), emb, pdt, fp, folder)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"format": fmt.name if fmt else "bf16", "shrink": shrink, "bytes": written,
            "seconds": round(time.monotonic() - t0, 1), "device": str(dev)}


# ============================================================================================ memory polling
def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def gpu_used_bytes(pid: int) -> tuple[int | None, str]:
    """VRAM of ``pid`` per ``nvidia-smi --query-compute-apps``; when the pid is not listed (a container's pid
    namespace), the sum over every compute app (only the server uses the GPU during the phase)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None, "none"
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            rows.append((int(parts[0]), int(parts[1]) * 2**20))
    mine = [b for p, b in rows if p == pid]
    if mine:
        return sum(mine), "nvidia-smi pid"
    if rows:
        return sum(b for _, b in rows), "nvidia-smi all compute apps"
    return 0, "nvidia-smi (no compute app)"


class PeakPoller:
    """Polls the server's memory every ``interval`` seconds in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, kind: str, interval: float = 0.2):
        self.pid, self.kind, self.interval = pid, kind, interval
        self.peak, self.samples, self.source = 0, 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        if self.kind == "rss":
            v, src = rss_bytes(self.pid), "/proc/pid/status VmRSS"
        else:
            v, src = gpu_used_bytes(self.pid)
        if v is not None:
            self.samples += 1
            self.source = src
            self.peak = max(self.peak, v)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)
        self.sample()


# ============================================================================================ ComfyUI runs
def comfyui_version(path: str) -> str | None:
    try:
        with open(os.path.join(path, "comfyui_version.py"), encoding="utf-8") as f:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
            return m.group(1) if m else None
    except OSError:
        return None


def _server_class():
    from comfyui_server import ComfyServer

    class PhaseServer(ComfyServer):
        """ComfyServer, optionally without ``--cpu`` (the GPU run)."""

        def __init__(self, *a, gpu: bool = False, **kw):
            super().__init__(*a, **kw)
            self.gpu = gpu

        def command(self):
            cmd = super().command()
            return [c for c in cmd if c != "--cpu"] if self.gpu else cmd

    return PhaseServer


def t2i_workflow(ckpt: str, gpu: bool) -> dict:
    from comfyui_server import load_api_workflow

    wf = load_api_workflow("text_to_image")
    for node in wf.values():
        if node["class_type"] == "UniARModelLoader":
            node["inputs"]["ckpt_name"] = ckpt
        if gpu and node["class_type"] == "UniARGenerate":
            node["inputs"].update(width=512, height=512)
        if gpu and node["class_type"] == "UniARDecode":
            node["inputs"].update(upsampling_ratio=2.0, steps=8)
    return wf


def _renumber(node: dict, prefix: str) -> dict:
    """A node whose links point at ``prefix`` + the linked node's id."""
    node = json.loads(json.dumps(node))
    for k, v in node["inputs"].items():
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
            node["inputs"][k] = [prefix + v[0], v[1]]
    return node


def caption_workflow(ckpt: str) -> dict:
    from comfyui_server import load_api_workflow

    wf = load_api_workflow("caption")
    for node in wf.values():
        if node["class_type"] == "UniARModelLoader":
            node["inputs"]["ckpt_name"] = ckpt
        if node["class_type"] == "UniARCaption":
            node["inputs"]["max_new_tokens"] = 8
    return wf


def _image_size(srv, entry: dict) -> list | None:
    for out in (entry.get("outputs") or {}).values():
        for img in out.get("images", []) or []:
            try:
                from PIL import Image

                with Image.open(srv.output_path(img)) as im:
                    return list(im.size)
            except Exception:  # noqa: BLE001 - the size is informative only
                return None
    return None


OOM = re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory", re.I)


def run_step(srv, wf: dict, kind: str, timeout: float) -> dict:
    from comfyui_server import execution_error

    t0 = time.monotonic()
    res: dict = {}
    with PeakPoller(srv.proc.pid, kind) as poll:
        try:
            entry = srv.run(wf, timeout=timeout)
            err = execution_error(entry)
            if err:
                res["error"] = f"{err.get('exception_type')}: {str(err.get('exception_message'))[:400]}"
            elif entry.get("status", {}).get("status_str") not in (None, "success"):
                res["error"] = f"status {entry['status'].get('status_str')}"
            else:
                size = _image_size(srv, entry)
                if size:
                    res["image_size"] = size
        except Exception as e:  # noqa: BLE001 - recorded in the JSON
            res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["peak_gb"] = round(poll.peak / GIB, 3)
    res["memory_source"] = poll.source
    res["samples"] = poll.samples
    res["oom"] = bool(res.get("error") and OOM.search(res["error"]))
    res["status"] = "failed" if res.get("error") else "ok"
    return res


def gpu_total_gib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return float(out[0]) / 1024 if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def prepare_checkpoint(args, budget: float, fmt: str, out: str) -> tuple[str, dict]:
    """-> (checkpoint folder, info): the dry run converts the fixture, the GPU run writes a real-size one."""
    folder = os.path.join(out, f"ckpt-{fmt}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, {"reused": True}
    if os.path.exists(folder):
        shutil.rmtree(folder)
    t0 = time.monotonic()
    if args.cpu_dry_run:
        from uniar_backend.quant.convert import convert

        info = convert(os.path.join(args.shared, "fixtures", "uniar-tiny"), fmt, folder)
        info["source"] = "uniar-tiny fixture, converted by uniar_backend.quant.convert"
    else:  # a child process: its CUDA context is released before ComfyUI starts
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--write-real-size", folder, "--format", fmt,
                            "--device", "cuda"], capture_output=True, text=True, timeout=max(30, args.remaining()))
        if p.returncode != 0:
            raise RuntimeError(f"the real-size writer failed ({p.returncode}): {(p.stdout + p.stderr)[-1500:]}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        info["source"] = "real-size random checkpoint written on the GPU"
    info["write_seconds"] = round(time.monotonic() - t0, 1)
    return folder, info


def run_budget(args, budget: float, out: str, total_gib: float | None) -> dict:
    gpu = not args.cpu_dry_run
    fmt = budget_format(budget)
    run = {"budget_gb": budget, "format": fmt, "seconds": None, "peak_vram_gb": None, "under_budget": None,
           "status": "failed", "error": None}
    t0 = time.monotonic()
    srv = None
    try:
        folder, info = prepare_checkpoint(args, budget, fmt, out)
        run["checkpoint"] = info
        base = os.path.join(out, f"comfy-base-{fmt}-{budget:g}")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(os.path.join(base, "uniar_models"))
        a, b = f"phase-{fmt}", f"phase-{fmt}-second"  # two names, two model slots, one folder on disk
        os.symlink(folder, os.path.join(base, "uniar_models", a), target_is_directory=True)
        os.symlink(folder, os.path.join(base, "uniar_models", b), target_is_directory=True)
        extra_args, extra_nodes = [], []
        if gpu:
            if total_gib:
                run["reserve_vram_gb"] = round(max(0.0, total_gib - budget), 2)
                extra_args += ["--reserve-vram", f"{run['reserve_vram_gb']:g}"]
        else:
            from comfyui_server import SIM_DYNAMIC_VRAM

            extra_nodes.append(SIM_DYNAMIC_VRAM)
        run["comfyui_args"] = extra_args
        srv = _server_class()(args.comfyui, os.environ.get("COMFYUI_PYTHON") or sys.executable, base=base,
                              extra_args=extra_args, extra_custom_nodes=extra_nodes, gpu=gpu)
        ts = time.monotonic()
        srv.start(timeout=max(30, min(180, args.remaining())))
        run["startup_seconds"] = round(time.monotonic() - ts, 1)
        logtext = srv.log_text()
        run["dynamic_vram"] = ("DynamicVRAM support detected and enabled" in logtext if gpu else
                               "sim_dynamic_vram: WINDOWS=True" in logtext)
        kind = "vram" if gpu else "rss"
        steps = {}
        steps["t2i"] = run_step(srv, t2i_workflow(a, gpu), kind, timeout=max(30, args.remaining()))
        if steps["t2i"]["status"] == "ok" and args.remaining() > 20:
            # The same t2i nodes (cached by ComfyUI: their outputs, so the first model's handle, stay alive) plus
            # a caption on the second name: a second AR model must load while the first AR model and the decoder
            # are still loaded, so ComfyUI has to make room (evict) rather than fail.
            wf = dict(t2i_workflow(a, gpu))
            wf.update({"c" + k: _renumber(v, "c") for k, v in caption_workflow(b).items()})
            released = f"UniAR: released the loaded parts of {a} ("
            before = srv.log_text().count(released)
            steps["second_model"] = run_step(srv, wf, kind, timeout=max(20, args.remaining()))
            steps["second_model"]["what"] = (f"caption on {b} (a second AR model) in one prompt with the cached t2i "
                                             f"nodes of {a} (its AR model and decoder stay loaded)")
            steps["second_model"]["first_model_released_meanwhile"] = srv.log_text().count(released) > before
        elif steps["t2i"]["status"] == "ok":
            steps["second_model"] = {"status": "skipped", "reason": "the GPU phase's time budget ran out"}
        run["steps"] = steps
        run["seconds"] = steps["t2i"]["seconds"]
        peak = max((s.get("peak_gb") or 0) for s in steps.values())
        run["peak_vram_gb" if gpu else "peak_rss_gb"] = round(peak, 3)
        if gpu:
            run["under_budget"] = bool(peak <= budget)
        errors = [f"{k}: {s['error']}" for k, s in steps.items() if s.get("error")]
        if gpu and run["under_budget"] is False:
            errors.append(f"peak VRAM {peak:.2f} GiB over the {budget:g} GB budget")
        run["error"] = "; ".join(errors) or None
        run["status"] = "failed" if errors else "ok"
        if os.environ.get("UNIAR_PHASE_KEEP_LOG") or run["status"] != "ok":
            tb = [ln for ln in srv.log_text().splitlines() if "Error" in ln or "error" in ln][-8:]
            if tb:
                run["log_errors"] = tb
    except Exception as e:  # noqa: BLE001 - recorded, the other budgets go on
        run["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        log(traceback.format_exc())
    finally:
        if srv is not None:
            srv.stop()
    run["total_seconds"] = round(time.monotonic() - t0, 1)
    return run


RUN_KEYS = ("budget_gb", "format", "seconds", "peak_vram_gb", "peak_rss_gb", "under_budget", "status", "error",
            "startup_seconds", "total_seconds", "dynamic_vram", "reserve_vram_gb")


def compact(result: dict, out: str, limit: int = 2800) -> dict:
    """The stdout line: the top-level fields and each run's main fields (errors cut short); the full result is
    DIR/result.json."""
    c = {k: v for k, v in result.items() if k not in ("runs", "notes", "budget_unit", "comfyui_path")}
    c["result_file"] = os.path.join(out, "result.json")
    c["runs"] = []
    for r in result["runs"]:
        x = {k: r[k] for k in RUN_KEYS if k in r}
        if x.get("error"):
            x["error"] = str(x["error"])[:300]
        ck = r.get("checkpoint") or {}
        if ck.get("write_seconds") is not None:
            x["checkpoint_write_seconds"] = ck["write_seconds"]
        for name, st in (r.get("steps") or {}).items():
            x[name] = {k: st[k] for k in ("status", "seconds", "peak_gb", "oom", "first_model_released_meanwhile",
                                          "image_size", "reason") if k in st}
        c["runs"].append(x)
    c["notes"] = [n[:200] for n in result.get("notes", [])]
    while len(json.dumps(c)) > limit and c["notes"]:
        c["notes"].pop()
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="a ComfyUI source tree")
    p.add_argument("--out", help="working folder (checkpoints, server base folders, result.json)")
    p.add_argument("--budgets", default="8,12", help="VRAM budgets in GB (default 8,12)")
    p.add_argument("--cpu-dry-run", action="store_true", help="fixture sizes on the CPU (what CI runs)")
    p.add_argument("--time-budget", type=float, default=GPU_TIME_BUDGET, help="seconds for the whole phase")
    p.add_argument("--shared", default=os.environ.get("UNIAR_SHARED", os.path.join(os.path.dirname(ROOT), "shared")))
    p.add_argument("--write-real-size", metavar="DIR", help="only write a random real-size checkpoint into DIR")
    p.add_argument("--format", default="int4", help="with --write-real-size: int4, int8, fp8 or bf16")
    p.add_argument("--shrink", type=int, default=1, help="with --write-real-size: divide widths and depths")
    p.add_argument("--device", default="cuda", help="with --write-real-size: where the tensors are drawn")
    a = p.parse_args(argv)
    if a.write_real_size:
        info = write_real_size(a.write_real_size, a.format, a.device, a.shrink)
        print(json.dumps(info))
        return 0
    if not a.comfyui or not a.out:
        p.error("--comfyui and --out are required")
    t_start = time.monotonic()
    # the CPU dry run is not held to the GPU's 200 s (gpu_check's own timeout still applies)
    limit = a.time_budget if not a.cpu_dry_run else max(a.time_budget, 900.0)
    a.remaining = lambda: limit - (time.monotonic() - t_start)
    budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("UNIAR_SHARED", a.shared)
    # gpu_check keeps the last 4000 characters of stdout + stderr (stderr after stdout) and reads the last JSON
    # line from them: everything but that line goes to DIR/phase.log, and the line itself is kept compact (the
    # full result is DIR/result.json).
    sys.stdout.flush()
    logf = open(os.path.join(out, "phase.log"), "a", encoding="utf-8")
    os.dup2(logf.fileno(), 2)
    sys.stderr = logf
    gpu = not a.cpu_dry_run
    total = gpu_total_gib() if gpu else None
    result = {"status": "failed", "comfyui_version": comfyui_version(a.comfyui), "comfyui_path": a.comfyui,
              "mode": "cpu-dry-run" if a.cpu_dry_run else "gpu", "memory": "vram" if gpu else "rss",
              "gpu_total_gib": round(total, 1) if total else None,
              "budget_unit": "GiB (2^30 bytes), compared with the peak the poller saw",
              "budget_enforced": gpu, "runs": [], "notes": []}
    if a.cpu_dry_run:
        result["notes"].append("CPU dry run: the fixture uniar-tiny converted to each budget's format, ComfyUI --cpu "
                               "with simulated dynamic VRAM, t2i at 64x64; peak RSS of the server process instead "
                               "of VRAM; budgets not enforced (under_budget null)")
    else:
        result["notes"].append("decoder prompt: no text encoders in the checkpoint; random embeddings of the right "
                               "shapes ([1, 333, 4096] and [1, 2048]) in its .uniar_cache (the loader's path when "
                               "sd3_pipeline/text_encoder* are absent); tokenizer files from the fixture, its "
                               "special token ids in config.json")
        result["notes"].append("t2i: AR 512x512, upsampling ratio 2 (1024x1024 output), 8 decoder steps; second "
                               "model: caption (8 new tokens) on a second name of the same folder")
    for b in budgets:
        if gpu and a.remaining() < 45:
            result["runs"].append({"budget_gb": b, "format": budget_format(b), "seconds": None,
                                   "peak_vram_gb": None, "under_budget": None, "status": "skipped",
                                   "error": f"not run: the phase's {a.time_budget:g} s budget ran out"})
            result["notes"].append(f"budget {b:g} GB skipped for time")
            continue
        log(f"budget {b:g} GB ({budget_format(b)}) ...")
        result["runs"].append(run_budget(a, b, out, total))
        log(json.dumps(result["runs"][-1]))
    result["seconds"] = round(time.monotonic() - t_start, 1)
    done = [r for r in result["runs"] if r["status"] != "skipped"]
    result["partial"] = len(done) < len(result["runs"])
    ok = bool(done) and all(r["status"] == "ok" for r in done)
    result["status"] = "ok" if ok else "failed"
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(compact(result, out), separators=(",", ":")), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
