"""Soak: many generate + caption + decode cycles in one process; resident memory must not grow.

    .venv/bin/python scripts/soak.py [--cycles 50] [--model ../shared/fixtures/uniar-tiny-bsq64] [--json]
    COMFYUI_PATH=... COMFYUI_PYTHON=... .venv/bin/python scripts/soak.py --comfy [--cycles 20]

Library mode: one AR model and one decoder stay loaded (as in ComfyUI); each cycle generates tokens (a new seed),
captions them and decodes them.  ComfyUI mode: a real ComfyUI server (CPU) runs the text-to-image workflow with
a new seed per run, then the caption workflow.  After every cycle the resident set size (RSS) is read (library:
this process after ``gc.collect()``; ComfyUI: the server process); the report gives RSS after the warm-up cycles,
at the end, the growth, and the least-squares slope in MB per cycle over the second half.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def library(model_dir: str, cycles: int) -> list[float]:
    import torch

    from uniar_backend import api
    from uniar_backend.decoder import load_decoder

    torch.set_num_threads(1)
    ar = api.UniAR.load(model_dir, ("llm", "lm_head", "gen_head"), device="cpu", dtype="float32")
    dec = load_decoder(ar.checkpoint, device="cpu", dtype=torch.float32)
    out = []
    for i in range(cycles):
        tok = ar.generate(["a red cube on a blue table"], 64, 64, seed=i)
        ar.caption("What is it?", tokens=tok, max_new_tokens=8)
        dec.decode(tok, steps=2, seed=i)
        gc.collect()
        out.append(rss_mb())
    return out


def comfy(cycles: int) -> list[float]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from comfyui_server import ComfyServer, load_api_workflow

    srv = ComfyServer(os.environ["COMFYUI_PATH"], os.environ.get("COMFYUI_PYTHON"))
    out = []
    try:
        srv.start(timeout=240)
        t2i, cap = load_api_workflow("text_to_image"), load_api_workflow("caption")
        for i in range(cycles):
            t2i["2"]["inputs"]["seed"] = 1000 + i
            cap_node = next(k for k, v in cap.items() if v["class_type"] == "UniARCaption")
            cap[cap_node]["inputs"]["seed"] = i
            cap[cap_node]["inputs"]["question"] = f"What is in picture {i}?"
            for wf in (t2i, cap):
                entry = srv.run(wf, timeout=600)
                if entry.get("status", {}).get("status_str") != "success":
                    raise RuntimeError(f"run {i} failed: {entry.get('status')}")
            out.append(rss_mb(srv.proc.pid))
    finally:
        srv.cleanup()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=None, help="default 50 (library) / 20 (ComfyUI)")
    p.add_argument("--model", default=os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "uniar-tiny-bsq64"))
    p.add_argument("--comfy", action="store_true", help="queue runs in a real ComfyUI (COMFYUI_PATH) instead")
    p.add_argument("--warmup", type=int, default=3, help="cycles before the reference reading (default 3)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cycles = a.cycles or (20 if a.comfy else 50)
    series = comfy(cycles) if a.comfy else library(a.model, cycles)
    base = series[min(a.warmup, len(series)) - 1]
    half = series[len(series) // 2:]
    rep = {"mode": "comfyui" if a.comfy else "library", "cycles": cycles, "rss_mb_after_warmup": round(base, 1),
           "rss_mb_end": round(series[-1], 1), "growth_mb": round(series[-1] - base, 1),
           "slope_mb_per_cycle_second_half": round(slope(half), 3), "rss_mb": [round(x, 1) for x in series]}
    print(json.dumps(rep) if a.json else
          f"{rep['mode']}: {cycles} cycles, RSS after {a.warmup} warm-up cycles {base:.1f} MB, end "
          f"{series[-1]:.1f} MB, growth {rep['growth_mb']:+.1f} MB, slope over the second half "
          f"{rep['slope_mb_per_cycle_second_half']:+.3f} MB/cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
