"""AR sampler benchmark (``python -m uniar_backend.bench``): the fast path against the reference loop on the same random weights, in one process.

    python -m uniar_backend.bench                  # CPU, proportionate config, N = 256 steps, 3 interleaved repeats
    python -m uniar_backend.bench --steps 900 --repeats 1
    python -m uniar_backend.bench --json           # one JSON object per run + a summary line
    python -m uniar_backend.bench --batch-size 4,8 --json   # images/min at batch 1, 4, 8 (256x256), batch_speedup
    python -m uniar_backend.bench --real-size      # GPU: real UniAR sizes, bf16 (bandwidth / matmul ceilings, DiT,
                                                   # images/min of batched AR at batch 1, 4, 8)
    PYTHONPATH=<ComfyUI> <ComfyUI python> -m uniar_backend.bench --ops comfy --json   # plain vs ComfyUI layers

Proportionate config (CPU): the real model's proportions scaled down, random weights (``synthetic``): LLM : stack
depth 18 : 2, hidden 256, 8 heads of 32 (GQA 4:1), MLP 768, bsq_dim 64, 4 levels, 2x2 merge, one prompt with CFG
(2 rows: 32 prompt tokens and a 22-token left-padded empty prompt).  ``--steps N`` generates an image of N tokens
(the most square grid, e.g. 256 = 16 x 16 tokens = 512 x 512 pixels, 900 = 960 x 960).  After a warm-up the modes
run interleaved (fast, reference, reference, fast, ...) ``--repeats`` times; reported per run: ms/step over steps
1..32 and over the last 32 steps (step 0 includes the prefill and is left out), seconds for the whole image,
peak RSS (CPU) or peak allocated memory (CUDA); then the medians, the ratio reference / fast and whether every run
produced the same tokens.  Both modes run with the same intra-op thread count (``--threads``, default 1: the fast
path's CPU loop is single-threaded for a model this size anyway).  Timings are wall-clock; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from .. import prompting
from ..sampling import MODES, Prefix, sample
from . import synthetic


WARM_SETTINGS = {"auto": "auto", "on": True, "off": False}


# ---------------------------------------------------------------------------------------------- helpers
def grid_for(n: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows * cols = n, rows <= cols."""
    r = int(math.isqrt(n))
    while n % r:
        r -= 1
    return r, n // r


def make_prefix(model, rows: int, cols: int, prompt_len: int = 32, uncond_len: int = 22, seed: int = 0,
                batch: int = 1) -> Prefix:
    """A CFG prefix like ``api.build_prefix`` makes for ``batch`` prompts (their conditional rows, then their
    left-padded empty-prompt rows), with random token ids instead of a tokenizer: the last token is
    ``<|vision_start|>``."""
    mc = model.cfg
    g = torch.Generator().manual_seed(seed)
    L, N, R = prompt_len, rows * cols, 2 * batch
    ids = torch.randint(0, min(600, mc.text.vocab_size), (R, L), generator=g)
    ids[:, -1] = mc.vision_start_token_id
    mask = torch.ones(R, L, dtype=torch.long)
    mask[batch:, : L - uncond_len] = 0
    all_ids = torch.cat([ids, torch.full((R, N), mc.image_token_id)], dim=1)
    all_mask = torch.cat([mask, torch.ones(R, N, dtype=torch.long)], dim=1)
    grid = (1, rows * mc.vision.spatial_merge_size, cols * mc.vision.spatial_merge_size)
    pos = prompting.rope_index(all_ids, all_mask, [[grid]] * R, mc.image_token_id, mc.vision_start_token_id,
                               mc.vision.spatial_merge_size)
    with torch.inference_mode():
        emb = model.language_model.embed_tokens(ids.to(model.device))
    return Prefix(embeds=emb, mask=mask.bool(), positions=pos, num_tokens=N)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated, else the process's peak RSS (VmHWM, reset per phase where
    Linux allows it; otherwise the process-lifetime peak)."""

    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        self.mb = self.read()
        return False

    def read(self) -> float:
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dev) / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(model, prefix, mode, cfg=1.5, seed=0, **options):
    """One image; returns (bits, step end times relative to the start, total seconds, peak MB)."""
    dev = model.device
    marks = []

    def cb(i, n):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # timing only: makes the per-step marks honest on an async device
        marks.append(time.perf_counter())

    _sync(dev)
    with PeakMemory(dev) as pm:
        t0 = time.perf_counter()
        bits = sample(model, prefix, cfg, 1.0, seed, mode, callback=cb, **options)
        _sync(dev)
        t1 = time.perf_counter()
    return bits, [m - t0 for m in marks], t1 - t0, pm.mb


def window_ms(marks: list[float], first: bool, k: int = 32) -> float:
    """ms/step over steps 1..k (first) or the last k steps; step 0 (prefill + first draw) is left out."""
    n = len(marks)
    k = max(1, min(k, (n - 1) // 2 if n > 2 else 1))
    if n < 2:
        return marks[0] * 1e3 if marks else float("nan")
    if first:
        return (marks[k] - marks[0]) / k * 1e3
    return (marks[-1] - marks[-1 - k]) / k * 1e3


def _emit(args, rec: dict, text: str):
    if args.json:
        print(json.dumps(rec), flush=True)
    else:
        print(text, flush=True)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------- A/B benchmark
def run_ab(args) -> dict:
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.tiny:
        cfg = synthetic.make_config(hidden=64, layers=4, stack_depth=2, heads=4, kv_heads=2, head_dim=16,
                                    intermediate=192, vocab=704, bsq_dim=64)
    else:
        cfg = synthetic.proportionate_config()
    model = synthetic.random_model(cfg, ("llm", "vision", "gen_head"), dev, dtype, seed=args.seed)
    rows, cols = grid_for(args.steps)
    prefix = make_prefix(model, rows, cols, seed=args.seed)
    nparam = sum(p.numel() for p in model.parameters())
    if not args.json:
        print(f"# machine: {machine()}")
        print(f"# model: proportionate random UniAR ({nparam / 1e6:.1f}M parameters, {args.dtype}, {dev}); "
              f"image {rows}x{cols} tokens = {rows * 32}x{cols * 32} px, N = {args.steps} steps, CFG rows 2")
    # warm-up (allocator, kernels, first-call costs) on a short image, both modes
    warm = make_prefix(model, *grid_for(min(args.steps, 16)), seed=args.seed)
    opts = {m: ({"cpu_warm": WARM_SETTINGS[args.cpu_warm]} if m == "fast" else {}) for m in MODES}
    for mode in MODES:
        timed_run(model, warm, mode, seed=args.seed, **opts[mode])

    runs = {m: [] for m in MODES}
    ref_bits = None
    identical = True
    for r in range(args.repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            bits, marks, total, peak = timed_run(model, prefix, mode, seed=args.seed, **opts[mode])
            if ref_bits is None:
                ref_bits = bits
            elif not torch.equal(bits, ref_bits):
                identical = False
            rec = {"mode": mode, "steps": args.steps, "repeat": r,
                   "ms_per_step_first32": round(window_ms(marks, True), 4),
                   "ms_per_step_last32": round(window_ms(marks, False), 4),
                   "seconds_per_image": round(total, 4), "peak_rss_mb": round(peak, 1)}
            runs[mode].append(rec)
            _emit(args, rec, f"{mode:9s} repeat {r}: {rec['ms_per_step_first32']:8.2f} ms/step (steps 1-32)  "
                             f"{rec['ms_per_step_last32']:8.2f} ms/step (last 32)  {total:8.2f} s/image  "
                             f"peak {'VRAM' if dev.type == 'cuda' else 'RSS'} {peak:.0f} MB")
    med = {m: statistics.median(x["seconds_per_image"] for x in runs[m]) for m in MODES}
    first = {m: statistics.median(x["ms_per_step_first32"] for x in runs[m]) for m in MODES}
    last = {m: statistics.median(x["ms_per_step_last32"] for x in runs[m]) for m in MODES}
    summary = {"summary": True, "steps": args.steps, "ratio": round(med["reference"] / med["fast"], 3),
               "tokens_identical": bool(identical),
               "median_seconds": {m: round(v, 4) for m, v in med.items()},
               "median_ms_per_step_first32": {m: round(v, 4) for m, v in first.items()},
               "median_ms_per_step_last32": {m: round(v, 4) for m, v in last.items()},
               "fast_last32_over_first32": round(last["fast"] / first["fast"], 3),
               "repeats": args.repeats, "threads": torch.get_num_threads(), "device": str(dev),
               "cpu_warm": args.cpu_warm, "machine": machine()}
    text = (f"summary N={args.steps}: median s/image fast {med['fast']:.2f}, reference {med['reference']:.2f}; "
            f"ratio reference/fast {summary['ratio']:.2f}x; fast last32/first32 "
            f"{summary['fast_last32_over_first32']:.2f}; reference last32/first32 "
            f"{last['reference'] / first['reference']:.2f}; tokens identical: {identical}")
    _emit(args, summary, text)
    return summary


# ---------------------------------------------------------------------------------------------- batch throughput
class BatchTimer:
    """Batches of 1..max(sizes) prompts of one random prefix (their conditional rows, then their empty-prompt rows),
    sampled by the fast path with one seed per prompt, as the batch runner does (``uniar_backend.batch``)."""

    def __init__(self, model, rows: int, cols: int, sizes, seed: int = 0, cfg: float = 2.0, **options):
        self.model, self.cfg, self.options = model, cfg, options
        self.sizes = [1] + [b for b in sizes if b != 1]
        self.biggest = max(self.sizes)
        self.full = make_prefix(model, rows, cols, seed=seed, batch=self.biggest)
        self.seeds = [seed + i for i in range(self.biggest)]

    def prefix(self, b: int, first: int = 0) -> Prefix:
        """Prompts ``first`` .. ``first + b - 1`` (their conditional rows, then their empty-prompt rows)."""
        n, f = self.biggest, self.full
        pick = list(range(first, first + b)) + list(range(n + first, n + first + b))
        return Prefix(embeds=f.embeds[pick], mask=f.mask[pick], positions=f.positions[:, pick], num_tokens=f.num_tokens)

    def sample(self, b: int, first: int = 0):
        return sample(self.model, self.prefix(b, first), self.cfg, 1.0, self.seeds[first : first + b], "fast",
                      **self.options)

    def seconds(self, b: int) -> float:
        dev = self.model.device
        _sync(dev)
        t0 = time.perf_counter()
        self.sample(b)
        _sync(dev)
        return time.perf_counter() - t0

    def agreement(self) -> dict[int, float]:
        """Per batch size, the share of each row's tokens equal to its prompt sampled alone with its seed: the same
        draws, but rows computed together round differently in the last bits (other GEMM shapes), which can flip a
        token and let the rest of that image diverge."""
        alone = [self.sample(1, i)[0] for i in range(self.biggest)]
        out = {}
        for b in self.sizes:
            bits = self.sample(b)
            out[b] = sum(float((bits[i] == alone[i]).all(-1).all(-1).all(-1).float().mean()) for i in range(b)) / b
        return out


def run_batches(args) -> dict:
    """Images/min of the fast sampler at batch 1 and at each ``--batch-size`` (the batch runner's AR forward: one
    seed per prompt), interleaved repeats, same model and run; ``batch_speedup`` = images/min at B / at 1.  Also
    how many tokens of every row equal its prompt drawn alone with its seed."""
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    cfg = (synthetic.make_config(hidden=64, layers=4, stack_depth=2, heads=4, kv_heads=2, head_dim=16,
                                 intermediate=192, vocab=704, bsq_dim=64) if args.tiny
           else synthetic.proportionate_config())
    model = synthetic.random_model(cfg, ("llm", "vision", "gen_head"), dev, dtype, seed=args.seed)
    rows, cols = grid_for(args.steps)
    timer = BatchTimer(model, rows, cols, args.batch_size, args.seed, cpu_warm=WARM_SETTINGS[args.cpu_warm])
    sizes = timer.sizes
    if not args.json:
        print(f"# machine: {machine()}")
        print(f"# model: proportionate random UniAR ({args.dtype}, {dev}); image {rows}x{cols} tokens = "
              f"{rows * 32}x{cols * 32} px, CFG; batch sizes {sizes}; AR tokens only (the decoder batches alike)")
    warm = make_prefix(model, *grid_for(min(args.steps, 16)), seed=args.seed)
    sample(model, warm, 1.5, 1.0, [args.seed], "fast", **timer.options)
    runs: dict[int, list] = {b: [] for b in sizes}
    for r in range(args.repeats):
        for b in (sizes if r % 2 == 0 else sizes[::-1]):
            sec = timer.seconds(b)
            runs[b].append(sec)
            rec = {"batch_size": b, "repeat": r, "seconds": round(sec, 4), "images_per_min": round(60 * b / sec, 2)}
            _emit(args, rec, f"batch {b:3d} repeat {r}: {sec:7.3f} s  {rec['images_per_min']:8.1f} images/min")
    agree = timer.agreement()
    per_min = {b: 60 * b / statistics.median(runs[b]) for b in sizes}
    summary = {"summary": True, "steps": args.steps, "image_px": [rows * 32, cols * 32],
               "images_per_min": {str(b): round(v, 2) for b, v in per_min.items()},
               "batch_speedup": {str(b): round(per_min[b] / per_min[1], 3) for b in sizes if b != 1},
               "tokens_equal_alone": {str(b): round(v, 4) for b, v in agree.items()}, "repeats": args.repeats,
               "threads": torch.get_num_threads(), "device": str(dev), "machine": machine()}
    text = ("summary: images/min " + ", ".join(f"batch {b}: {v:.1f}" for b, v in per_min.items()) + "; speedup "
            + ", ".join(f"{b}: {summary['batch_speedup'][str(b)]:.2f}x" for b in sizes if b != 1)
            + "; tokens equal to each prompt alone: " + ", ".join(f"{b}: {v:.1%}" for b, v in agree.items()))
    _emit(args, summary, text)
    return summary


# ---------------------------------------------------------------------------------------------- layer classes
def comfy_layers(device: torch.device):
    """ComfyUI's layer namespace (``comfy.ops.disable_weight_init``), or an error saying how to make it importable.
    Outside a ComfyUI process its device choice is made here (``--cpu`` for a CPU run, as ComfyUI's own flag)."""
    try:
        import comfy.cli_args

        if device.type == "cpu":
            comfy.cli_args.args.cpu = True
        import comfy.ops
    except ImportError as e:
        raise SystemExit(f"--ops comfy needs ComfyUI importable ({e}); run with ComfyUI's interpreter and "
                         "PYTHONPATH=<ComfyUI folder>") from None
    return comfy.ops.disable_weight_init


def with_layers(model, ops):
    """The same model (same tensors) built from another layer namespace."""
    from ..checkpoint import build_on_meta
    from ..modeling.uniar import UniARModel

    twin, _ = build_on_meta(lambda o: UniARModel(model.cfg, model.components, ops=o, dtype=model.dtype), ops)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    twin.attention, twin.fingerprint = model.attention, model.fingerprint
    return twin.eval().requires_grad_(False)


class ModuleCalls:
    """Counts calls of layer modules (Linear, LayerNorm, Embedding and subclasses) through their own forward."""

    def __init__(self, model):
        kinds = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, kinds)]

    def _hook(self, *_):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


def run_ops(args) -> dict:
    """Fast sampler, plain torch layers vs ComfyUI's layers, same weights, interleaved; per AR step: time and the
    layer calls that went through a module's forward instead of the lean path (prefill excluded)."""
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    cfg = synthetic.proportionate_config() if not args.tiny else synthetic.make_config(
        hidden=64, layers=4, stack_depth=2, heads=4, kv_heads=2, head_dim=16, intermediate=192, vocab=704, bsq_dim=64)
    plain = synthetic.random_model(cfg, ("llm", "vision", "gen_head"), dev, dtype, seed=args.seed)
    models = {"torch": plain, "comfy": with_layers(plain, comfy_layers(dev))}
    rows, cols = grid_for(args.steps)
    prefix = make_prefix(plain, rows, cols, seed=args.seed)
    warm = make_prefix(plain, *grid_for(min(args.steps, 16)), seed=args.seed)
    for m in models.values():
        timed_run(m, warm, "fast", seed=args.seed)
    calls = {}
    for name, m in models.items():  # layer calls per step, steps 2..N (step 1 carries the prefill)
        counter, marks = ModuleCalls(m), []
        sample(m, prefix, 1.5, 1.0, args.seed, "fast", callback=lambda i, n, c=counter: marks.append(c.count))
        counter.close()
        calls[name] = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
    times = {k: [] for k in models}
    bits = {}
    for r in range(args.repeats):
        for name in (("torch", "comfy") if r % 2 == 0 else ("comfy", "torch")):
            b, marks, total, _ = timed_run(models[name], prefix, "fast", seed=args.seed)
            bits.setdefault(name, b)
            times[name].append((marks[-1] - marks[0]) / max(1, len(marks) - 1) * 1000)
    ms = {k: statistics.median(v) for k, v in times.items()}
    summary = {"summary": True, "ops": "comfy", "steps": args.steps, "ms_per_step": {k: round(v, 4) for k, v in
                                                                                     ms.items()},
               "ops_ratio": round(ms["torch"] / ms["comfy"], 3),
               "tokens_identical": bool(torch.equal(bits["torch"], bits["comfy"])),
               "module_calls": round(calls["comfy"], 2), "module_calls_torch": round(calls["torch"], 2),
               "repeats": args.repeats, "device": str(dev), "machine": machine()}
    _emit(args, summary, f"ops comfy N={args.steps}: ms/step torch {ms['torch']:.3f}, comfy {ms['comfy']:.3f}; "
                         f"ops_ratio {summary['ops_ratio']:.3f}; module calls per step through forward: comfy "
                         f"{summary['module_calls']:g}, torch {summary['module_calls_torch']:g}; tokens identical: "
                         f"{summary['tokens_identical']}")
    return summary


# ---------------------------------------------------------------------------------------------- real sizes (GPU)
def _time_cuda(fn, dev, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (CUDA events on CUDA, perf_counter elsewhere)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def _shrunk(d: dict, k: int, keys=(), layer_keys=()) -> dict:
    d = dict(d)
    for key in keys:
        if key in d:
            d[key] = max(1, d[key] // k)
    for key in layer_keys:
        if key in d:
            d[key] = max(1, d[key] // k)
    return d


def ar_step_bytes(model, rows: int, mean_len: int) -> int:
    """Bytes one AR step must read: LLM + stack layers, vistok head, the BSQ output projections and mergers
    (not the embeddings, lm_head or the vision blocks), plus the KV caches at the mean sequence length."""
    def nbytes(mod):
        return sum(p.numel() * p.element_size() for p in mod.parameters())

    v = model.visual
    b = nbytes(model.language_model.layers) + nbytes(model.visual_decoder) + nbytes(model.output_layer_vistok)
    b += nbytes(v.merger) + nbytes(v.deepstack_merger_list)
    for lv in range(model.cfg.vision.levels):
        b += nbytes(getattr(v, "bsq_output_proj" if lv == 0 else f"bsq_output_proj_list_{lv - 1}"))
    tc = model.cfg.text
    layers = tc.num_hidden_layers + model.cfg.visual_transformer_decoder_depth
    elt = next(model.parameters()).element_size()
    b += layers * 2 * rows * tc.num_key_value_heads * tc.head_dim * mean_len * elt
    return b


def run_real(args) -> dict:
    """Real UniAR sizes, random weights made on the device, bf16.  ``--shrink K`` (hidden) divides every width
    and depth by K so the phases can be exercised on a CPU."""
    dev = torch.device(args.device)
    dtype = torch.bfloat16
    k = args.shrink
    res = {"real_size": True, "device": str(dev), "shrink": k, "weights": args.weights}
    fmt = None
    if args.weights != "bf16":  # the AR and DiT target Linears in a low-VRAM format, quantised on the device
        from ..quant.formats import check_device, get

        fmt = get(args.weights)
        check_device(fmt, dev)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    say = (lambda s: None) if args.json else (lambda s: print(s, flush=True))
    say(f"# real-size benchmark on {res.get('gpu', machine())}" + (f" (shrunk by {k})" if k > 1 else ""))

    # 1. device-to-device copy bandwidth (read + write bytes) and a large bf16 matmul
    nbytes = (2 << 30) // k if k > 1 else 2 << 30
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src), dev, reps=10, warmup=2)
    bw = 2 * nbytes / t
    src = dst = None  # free
    n = 8192 // k if k > 1 else 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = _time_cuda(lambda: a @ b, dev, reps=10, warmup=2)
    mm_flops = 2 * n**3 / t
    a = b = None
    res.update(copy_bandwidth_gbs=round(bw / 1e9, 1), matmul_tflops=round(mm_flops / 1e12, 1))
    say(f"device copy bandwidth {bw / 1e9:.0f} GB/s (read + write); bf16 {n}^3 matmul {mm_flops / 1e12:.0f} TFLOP/s")

    # 2. AR: 512 x 512 image (256 steps), CFG rows 2
    cfg = synthetic.real_config()
    if k > 1:
        d = synthetic.config_dict(hidden=4096 // k, layers=max(2, 36 // k), stack_depth=4, heads=max(2, 32 // k),
                                  kv_heads=max(1, 8 // k), head_dim=128, intermediate=12288 // k, vocab=4096,
                                  bsq_dim=64, mrope_section=[24, 20, 20],
                                  vision={"hidden_size": 1152 // k, "num_heads": 2, "intermediate_size": 4304 // k,
                                          "depth": 4, "deepstack_visual_indexes": [0, 1, 2],
                                          "bsq_hidden_dim": 8192 // k, "out_hidden_size": 4096 // k})
        cfg = synthetic.config_from_dict(d)
    model = synthetic.random_model(cfg, ("llm", "vision", "gen_head"), dev, dtype, seed=args.seed)
    if fmt is not None:
        from ..quant.layers import AR_TARGETS, quantize_loaded

        res["ar_layers_quantised"] = len(quantize_loaded(model, AR_TARGETS, fmt))
    steps = args.ar_steps
    rows, cols = grid_for(steps)
    prefix = make_prefix(model, rows, cols, seed=args.seed)
    step_bytes = ar_step_bytes(model, 2, prefix.embeds.shape[1] + steps // 2)
    floor_ms = step_bytes / bw * 1e3
    res.update(ar_steps=steps, ar_weights_gb=round(step_bytes / 1e9, 2), ar_floor_ms=round(floor_ms, 3))
    say(f"AR: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters; one step reads "
        f"{step_bytes / 1e9:.2f} GB -> bandwidth floor {floor_ms:.2f} ms/step")
    warm = make_prefix(model, *grid_for(16), seed=args.seed)
    variants = [("fast", False), ("reference", False)]
    if dev.type == "cuda":
        variants.insert(1, ("fast", True))
    ar = {}
    for mode, graph in variants:
        opts = {"cuda_graph": graph} if mode == "fast" else {}
        name = mode + ("+cuda_graph" if graph else "")
        n_steps = steps if mode == "fast" else min(steps, args.ref_steps)
        p = prefix if n_steps == steps else make_prefix(model, *grid_for(n_steps), seed=args.seed)
        timed_run(model, warm, mode, seed=args.seed, **opts)
        bits, marks, total, peak = timed_run(model, p, mode, seed=args.seed, **opts)
        ms = (marks[-1] - marks[0]) / max(1, len(marks) - 1) * 1e3
        ar[name] = {"steps": n_steps, "ms_per_step": round(ms, 3), "seconds_per_image": round(total, 3),
                    "over_floor": round(ms / floor_ms, 2), "peak_mb": round(peak, 0),
                    "bits": bits}
        say(f"AR {name:18s}: {ms:8.2f} ms/step over {n_steps} steps = {ms / floor_ms:5.2f}x the bandwidth floor; "
            f"{total:.2f} s; peak {'VRAM' if dev.type == 'cuda' else 'RSS'} {ar[name]['peak_mb']:.0f} MB")
    # the batch runner's AR forward at the real sizes: images/min at batch 1 and at --batch-size (default 4, 8)
    bsteps = min(steps, 64)
    timer = BatchTimer(model, *grid_for(bsteps), args.batch_size or [4, 8], args.seed)
    timer.sample(1)  # warm-up at this shape
    per_min = {b: 60 * b / timer.seconds(b) for b in timer.sizes}
    res["ar_batch"] = {"steps": bsteps, "images_per_min": {str(b): round(v, 2) for b, v in per_min.items()},
                       "batch_speedup": {str(b): round(v / per_min[1], 3) for b, v in per_min.items() if b != 1}}
    say("AR batch (" + f"{bsteps} steps, CFG): " + ", ".join(f"batch {b}: {v:.1f} images/min" for b, v in
                                                            per_min.items()))
    del timer
    if "fast+cuda_graph" in ar:
        res["cuda_graph_tokens_identical_to_eager"] = bool(torch.equal(ar["fast"]["bits"],
                                                                       ar["fast+cuda_graph"]["bits"]))
    for v in ar.values():
        v.pop("bits")
    res["ar"] = ar
    best_ar = min(v["seconds_per_image"] for n_, v in ar.items() if n_.startswith("fast"))
    del model, prefix
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # 3. DiT decode at 1024 x 1024 with CFG (batch 2), SD3.5-Medium sizes + siglip_embed_add_latent
    from ..decoder.memory import SD35M_TRANSFORMER, SD3_VAE

    tcfg = dict(SD35M_TRANSFORMER)
    vcfg = dict(SD3_VAE)
    side = 1024
    if k > 1:
        tcfg.update(num_layers=max(2, 24 // k), num_attention_heads=max(2, 24 // k), joint_attention_dim=4096 // k,
                    caption_projection_dim=None, pooled_projection_dim=2048 // k, siglip_channels=4 * 1152 // k,
                    dual_attention_layers=[0])
        tcfg["caption_projection_dim"] = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
        vcfg.update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, layers_per_block=1)
        side = 64
    from diffusers.utils import logging as dlogging

    from ..decoder.vae import VAEDecoder

    from ..decoder.sd3 import UniARSD3Transformer

    dlogging.set_verbosity_error()

    with PeakMemory(dev) as pm_dit:
        with torch.device(dev):
            dit = UniARSD3Transformer.from_uniar_config(tcfg).to(dtype).eval().requires_grad_(False)
        if fmt is not None:
            from ..quant.layers import DIT_TARGETS, quantize_loaded

            res["dit_layers_quantised"] = len(quantize_loaded(dit, DIT_TARGETS, fmt))
        h = side // 8
        lat = torch.randn(2, 16, h, h, device=dev, dtype=dtype)
        txt = torch.randn(2, 77 + 256, tcfg["joint_attention_dim"], device=dev, dtype=dtype)
        pooled = torch.randn(2, tcfg["pooled_projection_dim"], device=dev, dtype=dtype)
        ts = torch.full((2,), 500.0, device=dev, dtype=dtype)
        # decoder features of the 512 x 512 AR image (ratio 2): one 4*1152 vector per 16-px patch of the AR image
        sig = torch.randn(2, (side // 2 // 16) ** 2, tcfg["siglip_channels"], device=dev, dtype=dtype)
        grid = (side // 2 // 16, side // 2 // 16)

        def dit_step():
            with torch.inference_mode():
                return dit(lat, txt, pooled, ts, siglip_tensor=sig, token_grid=grid)

        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            dit_step()
        flops = fc.get_total_flops()
        t_dit = _time_cuda(dit_step, dev, reps=5 if dev.type == "cuda" else 1, warmup=1)
    dit_tflops = flops / t_dit / 1e12
    res.update(dit_ms_per_step=round(t_dit * 1e3, 2), dit_tflop_per_step=round(flops / 1e12, 2),
               dit_tflops=round(dit_tflops, 1), dit_fraction_of_matmul=round(flops / t_dit / mm_flops, 3),
               dit_peak_mb=round(pm_dit.mb, 0), decode_side=side)
    say(f"DiT {side}x{side} CFG batch 2: {t_dit * 1e3:.1f} ms/step, {flops / 1e12:.1f} TFLOP/step = "
        f"{dit_tflops:.0f} TFLOP/s = {100 * flops / t_dit / mm_flops:.0f}% of the matmul ceiling; "
        f"peak {pm_dit.mb:.0f} MB")
    dit = lat = txt = pooled = sig = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # 4. VAE decode at the decode side (SD3 VAE), then the end-to-end estimate
    with PeakMemory(dev) as pm_vae:
        with torch.device(dev):
            vae = VAEDecoder(vcfg).to(dtype).eval().requires_grad_(False)
        z = torch.randn(1, 16, side // 8, side // 8, device=dev, dtype=dtype)

        def vae_step():
            with torch.inference_mode():
                return vae.decode(z)[0]

        t_vae = _time_cuda(vae_step, dev, reps=3 if dev.type == "cuda" else 1, warmup=1)
    vae = z = None
    steps_dec = args.decode_steps
    e2e = best_ar + steps_dec * t_dit + t_vae
    res.update(vae_ms=round(t_vae * 1e3, 1), vae_peak_mb=round(pm_vae.mb, 0), decode_steps=steps_dec,
               end_to_end_seconds=round(e2e, 2))
    say(f"VAE decode {side}x{side}: {t_vae * 1e3:.0f} ms, peak {pm_vae.mb:.0f} MB")
    say(f"end to end (512x512 AR image, fast AR + {steps_dec} DiT steps + VAE at {side}x{side}; text encoders "
        f"excluded: the decoder prompt is fixed and its embeddings are cached): {e2e:.2f} s")
    if args.json:
        print(json.dumps(res), flush=True)
    return res


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m uniar_backend.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="AR steps = tokens of the image (default 256; with --batch-size 64 = 256x256 px)")
    p.add_argument("--batch-size", default=None,
                   help="batch throughput instead of the A/B run: images/min of the fast sampler at batch 1 and at "
                        "each of these sizes (e.g. 4 or 4,8), one seed per prompt as the batch runner draws, and "
                        "batch_speedup")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode after the warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (runs, then a summary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both modes (default 1: the fast path runs its CPU loop on one "
                        "thread anyway, so both modes get the same resources; 0 = torch's default)")
    p.add_argument("--cpu-warm", choices=tuple(WARM_SETTINGS), default="auto",
                   help="the fast sampler's CPU cache warming (uniar_backend.runtime.WeightWarming): auto (default, "
                        "chosen by timing its first steps), on or off; tokens are the same either way")
    p.add_argument("--device", default=None, help="default: cpu (cuda for --real-size)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--real-size", action="store_true", help="GPU benchmark at the real UniAR sizes, bf16")
    p.add_argument("--ar-steps", type=int, default=256, help="--real-size: AR steps (default 256 = 512x512)")
    p.add_argument("--ref-steps", type=int, default=64, help="--real-size: steps of the reference run")
    p.add_argument("--decode-steps", type=int, default=28, help="--real-size: DiT steps in the end-to-end sum")
    p.add_argument("--weights", choices=("bf16", "int8", "fp8", "int4"), default="bf16",
                   help="--real-size: the weight format of the AR and DiT target layers (default bf16)")
    p.add_argument("--ops", choices=("torch", "comfy"), default="torch",
                   help="comfy: the fast sampler with plain torch layers against the same model built from "
                        "ComfyUI's comfy.ops.disable_weight_init layers (ComfyUI importable, e.g. PYTHONPATH=<ComfyUI> "
                        "with its interpreter); reports ops_ratio and module_calls per AR step")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: a very small model
    p.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)  # tests: real-size phases, shrunk
    a = p.parse_args(argv)
    if a.batch_size is not None:
        try:
            a.batch_size = [int(x) for x in str(a.batch_size).split(",") if x.strip()]
        except ValueError:
            p.error("--batch-size takes sizes like 4 or 4,8")
        if not a.batch_size or not all(1 <= b <= 64 for b in a.batch_size):
            p.error("--batch-size sizes must be in 1..64")
    if a.steps is None:
        a.steps = 64 if a.batch_size else 256
    if a.steps < 1 or a.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    if a.device is None:
        a.device = "cuda" if a.real_size and a.shrink == 1 else "cpu"
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.real_size:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("--real-size needs a CUDA GPU (this machine has none); nothing measured", file=sys.stderr)
            return 2
        return 0 if run_real(args) else 1
    if args.ops == "comfy":
        run_ops(args)
        return 0
    if args.batch_size:
        run_batches(args)
        return 0
    run_ab(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
