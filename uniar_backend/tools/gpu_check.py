"""The first GPU in one command: ``bash scripts/gpu_check.sh --out DIR`` (this module does the work).

A GPU is lent only by chance and briefly, so one command measures everything the README promises about CUDA and
writes ``DIR/summary.json`` and ``DIR/summary.md``.  Each phase runs in a child process with its own time limit; a
phase that fails or times out is recorded (status, seconds, the tail of its output) and the others go on.

* ``environment``: GPU, driver, CUDA, torch, transformers, diffusers, huggingface_hub, flash-attn present or not;
* ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` on the device (``UNIAR_TEST_DEVICE``): the fixtures against
  their goldens in float32, bf16 against float32, the CUDA-graph step against the eager step, flash-attention
  against sdpa, the quantised layers against their CPU dequantisation, the decoder within 1 level;
* ``formats``: per weight format (bf16, int8, fp8, int4) the real-size benchmark (random weights at the real
  configs, made on the GPU; ``python -m uniar_backend.bench --real-size --weights F``): AR ms/step eager and with
  the CUDA-graph step against the bandwidth floor, DiT ms/step at 1024x1024 with CFG, VAE decode, end-to-end
  seconds, peak VRAM per phase;
* ``comfyui``: the budget claims inside ComfyUI (``scripts/gpu_comfy_phase.py``), when a ComfyUI tree is there
  (``COMFYUI_PATH``, or the one ``scripts/gpu_bundle.py`` packed); skipped, and said so, otherwise.

``--cpu-dry-run`` runs every phase on the CPU at reduced sizes (the tiny fixtures; the benchmark shrunk; the
ComfyUI phase with simulated dynamic VRAM), writing the same JSON, so the command, its arguments and its output
cannot break unnoticed before a GPU comes (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORMATS = ("bf16", "int8", "fp8", "int4")
TAIL = 4000  # characters of a phase's output kept in the summary


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_phase(cmd: list[str], timeout: float, env: dict | None = None, log: str | None = None) -> dict:
    """Run one phase's command: -> {status, seconds, returncode, output_tail}; never raises."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
        out = (p.stdout or "") + (p.stderr or "")
        status, rc = ("ok" if p.returncode == 0 else "failed"), p.returncode
    except subprocess.TimeoutExpired as e:
        out = ((e.stdout or b"").decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
              ((e.stderr or b"").decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        status, rc = "failed", None
        out += f"\n[gpu_check] timed out after {timeout:g} s"
    except OSError as e:
        out, status, rc = f"[gpu_check] could not start {cmd[0]}: {e}", "failed", None
    if log:
        with open(log, "w", encoding="utf-8") as f:
            f.write(out)
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "returncode": rc,
            "output_tail": out[-TAIL:]}


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------------------- phases
def environment() -> dict:
    """What the machine has (in this process: cheap, and it never fails the run)."""
    import importlib.util

    out: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "diffusers", "huggingface_hub", "safetensors", "accelerate"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[name] = f"missing ({type(e).__name__})"
    out["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    try:
        import torch

        out["cuda_available"] = bool(torch.cuda.is_available())
        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out["gpu"] = props.name
            out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            out["gpu_count"] = torch.cuda.device_count()
            out["compute_capability"] = f"{props.major}.{props.minor}"
            out["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    except Exception as e:  # noqa: BLE001
        out["cuda_error"] = f"{type(e).__name__}: {e}"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = q.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"failed: {e}"
    out["cpu_count"] = os.cpu_count()
    return out


def _limit(args, phase_limit: float) -> float:
    """A phase's time limit: its own, cut to what is left of the whole run's ``--deadline``."""
    left = args.deadline - (time.monotonic() - args.t0)
    return max(0.0, min(phase_limit, left))


def cuda_tests(args, out_dir: str) -> dict:
    xml = os.path.join(out_dir, "cuda_tests.xml")
    device = "cpu" if args.cpu_dry_run else args.device
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
           os.path.join("tests", "test_cuda.py"), f"--junitxml={xml}"]
    res = run_phase(cmd, _limit(args, args.phase_timeout), {"UNIAR_TEST_DEVICE": device},
                    os.path.join(out_dir, "cuda_tests.log"))
    res["device"] = device
    res.update(_junit(xml))
    if res.get("tests") == 0 and res["status"] == "ok":
        res["status"] = "failed"  # nothing ran: the phase measured nothing
    return res


def _junit(path: str) -> dict:
    """Counts and each test's outcome from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    if not os.path.isfile(path):
        return {"tests": 0}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {"tests": 0}
    cases = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")[:160]
        cases[name] = outcome
    return {"tests": len(cases), "passed": sum(v == "passed" for v in cases.values()),
            "failed": sum(v == "failed" for v in cases.values()),
            "skipped": sum(v.startswith("skipped") for v in cases.values()), "cases": cases}


def formats(args, out_dir: str) -> dict:
    res = {}
    for fmt in args.formats:
        cmd = [sys.executable, "-m", "uniar_backend.bench", "--real-size", "--weights", fmt, "--json"]
        if args.cpu_dry_run:
            cmd += ["--device", "cpu", "--shrink", "32", "--ar-steps", "4", "--ref-steps", "2", "--decode-steps", "2"]
        else:
            cmd += ["--device", args.device]
        if _limit(args, args.phase_timeout) < 10:
            res[fmt] = {"status": "skipped", "reason": f"out of time (--deadline {args.deadline:g} s)", "seconds": 0}
            continue
        r = run_phase(cmd, _limit(args, args.phase_timeout), None, os.path.join(out_dir, f"format_{fmt}.log"))
        r["result"] = _last_json(r["output_tail"]) if r["status"] == "ok" else None
        if r["status"] == "ok" and not r["result"]:
            r["status"] = "failed"
        res[fmt] = r
    return res


def comfyui(args, out_dir: str) -> dict:
    path = args.comfyui_path or os.environ.get("COMFYUI_PATH") or ""
    bundled = os.path.join(ROOT, ".gpu_bundle", "comfyui")
    if not path and os.path.isdir(bundled):
        path = bundled
    if not path or not os.path.isfile(os.path.join(path, "main.py")):
        return {"status": "skipped", "reason": "no ComfyUI tree: set COMFYUI_PATH (and COMFYUI_PYTHON); "
                                                "scripts/gpu_bundle.py packs one only when it fits the 64 MiB the "
                                                "device receives (.gpu_bundle/MANIFEST.json says)"}
    script = os.path.join(ROOT, "scripts", "gpu_comfy_phase.py")
    if not os.path.isfile(script):
        return {"status": "skipped", "reason": "scripts/gpu_comfy_phase.py is missing"}
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    lacking = _comfy_lacks(python)
    if lacking:
        return {"status": "skipped", "comfyui_path": path,
                "reason": f"{python} cannot start ComfyUI: it lacks {', '.join(lacking)} (see .gpu_bundle/MANIFEST.json "
                          "for what did not fit the 64 MiB the device receives)"}
    cmd = [python, script, "--comfyui", path, "--out", os.path.join(out_dir, "comfyui"),
           "--budgets", ",".join(str(b) for b in args.budgets)]
    if args.cpu_dry_run:
        cmd.append("--cpu-dry-run")
    if _limit(args, args.comfyui_timeout) < 30:
        return {"status": "skipped", "comfyui_path": path, "reason": f"out of time (--deadline {args.deadline:g} s)"}
    r = run_phase(cmd, _limit(args, args.comfyui_timeout), None, os.path.join(out_dir, "comfyui.log"))
    r["comfyui_path"] = path
    r["result"] = _last_json(r["output_tail"])
    if r["status"] == "ok" and not r["result"]:
        r["status"] = "failed"
    return r


# what ComfyUI 0.28 / 0.33 import at start-up beyond torch (a device lacking one cannot run the phase)
COMFY_STARTUP = ("torchvision", "torchsde", "einops", "scipy", "av", "sqlalchemy", "alembic", "kornia", "spandrel",
                 "pydantic", "safetensors", "aiohttp", "yaml", "PIL", "psutil")


def _comfy_lacks(python: str) -> list[str]:
    code = ("import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m) is None]))"
            % (COMFY_STARTUP,))
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else [f"(a working {python})"]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return [f"(a working {python})"]


# ---------------------------------------------------------------------------------------------- report
def markdown(s: dict) -> str:
    env = s["environment"]
    lines = [f"# GPU check ({'CPU dry run' if s['cpu_dry_run'] else env.get('gpu', 'no GPU')})", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, "
             f"diffusers {env.get('diffusers')}, flash-attn {'yes' if env.get('flash_attn') else 'no'}; "
             f"{s['seconds']} s in all", ""]
    ct = s["cuda_tests"]
    lines += [f"**CUDA correctness** ({ct.get('device')}): {ct['status']}, {ct.get('passed', 0)} passed, "
              f"{ct.get('failed', 0)} failed, {ct.get('skipped', 0)} skipped ({ct['seconds']} s)", ""]
    for name, outcome in sorted(ct.get("cases", {}).items()):
        lines.append(f"- `{name}`: {outcome}")
    lines += ["", "**Speed per weight format** (real sizes" + (", shrunk 32x on the CPU" if s["cpu_dry_run"] else "")
              + ")", "",
              "| format | status | AR ms/step eager | AR ms/step CUDA graph | floor ms | AR peak MB | AR images/min at "
              "batch 1 / 4 / 8 | DiT ms/step (CFG) | DiT peak MB | VAE ms | end to end s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt, r in s["formats"].items():
        x = r.get("result") or {}
        ar = x.get("ar", {})

        def g(d, k):
            v = d.get(k) if isinstance(d, dict) else None
            return "" if v is None else str(v)
        per_min = (x.get("ar_batch") or {}).get("images_per_min") or {}
        lines.append(f"| {fmt} | {r['status']} | {g(ar.get('fast', {}), 'ms_per_step')} | "
                     f"{g(ar.get('fast+cuda_graph', {}), 'ms_per_step')} | {g(x, 'ar_floor_ms')} | "
                     f"{g(ar.get('fast', {}), 'peak_mb')} | {' / '.join(str(v) for v in per_min.values())} | "
                     f"{g(x, 'dit_ms_per_step')} | {g(x, 'dit_peak_mb')} | "
                     f"{g(x, 'vae_ms')} | {g(x, 'end_to_end_seconds')} |")
    c = s["comfyui"]
    lines += ["", f"**ComfyUI budgets**: {c['status']}" + (f" ({c.get('reason')})" if c.get("reason") else "")]
    for row in ((c.get("result") or {}).get("runs") or []):
        lines.append(f"- {json.dumps(row)}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for summary.json, summary.md and each phase's log")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="every phase on this CPU at reduced sizes (what CI runs)")
    p.add_argument("--device", default="cuda", help="the device of the CUDA phases (default cuda)")
    p.add_argument("--formats", default=",".join(FORMATS), help="weight formats to measure (default all four)")
    p.add_argument("--budgets", default="8,12", help="ComfyUI VRAM budgets in GB (default 8,12)")
    p.add_argument("--phase-timeout", type=float, default=150, help="seconds per test / format phase (default 150)")
    p.add_argument("--comfyui-timeout", type=float, default=240, help="seconds for the ComfyUI phase (default 240)")
    p.add_argument("--deadline", type=float, default=470,
                   help="seconds for the whole run (default 470: under 8 minutes); each phase's limit is cut to "
                        "what is left, a phase with no time left is skipped and said so")
    p.add_argument("--comfyui-path", default=None, help="a ComfyUI tree (default $COMFYUI_PATH or the bundle's)")
    p.add_argument("--skip", default="", help="phases to skip: cuda_tests, formats, comfyui (comma separated)")
    a = p.parse_args(argv)
    a.formats = [f for f in a.formats.split(",") if f]
    bad = [f for f in a.formats if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    try:
        a.budgets = [int(b) for b in a.budgets.split(",") if b]
    except ValueError:
        p.error("--budgets takes whole numbers of GB, e.g. 8,12")
    a.skip = {x for x in a.skip.split(",") if x}
    unknown = a.skip - {"cuda_tests", "formats", "comfyui"}
    if unknown:
        p.error(f"unknown phase(s) to skip: {sorted(unknown)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    t0 = args.t0 = time.monotonic()
    summary: dict = {"cpu_dry_run": args.cpu_dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    summary["environment"] = environment()
    if not args.cpu_dry_run and not summary["environment"].get("cuda_available"):
        print("gpu_check: no CUDA device here; use --cpu-dry-run to exercise every phase on the CPU", file=sys.stderr)
        return 2

    skipped = {"status": "skipped", "reason": "--skip", "seconds": 0}
    phases = (("cuda_tests", cuda_tests), ("formats", formats), ("comfyui", comfyui))
    for name, fn in phases:
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        if name not in args.skip:
            summary[name] = fn(args, out_dir)
        else:  # formats: still one entry per format
            summary[name] = {f: dict(skipped) for f in args.formats} if name == "formats" else dict(skipped)
        _write(out_dir, summary, t0)  # after every phase: a run cut short still leaves its numbers
    statuses = [summary["cuda_tests"]["status"], summary["comfyui"]["status"],
                *(r["status"] for r in summary["formats"].values())]
    with open(os.path.join(out_dir, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    return 1 if "failed" in statuses else 0


def _write(out_dir: str, summary: dict, t0: float) -> None:
    from ..fileio import atomic_path

    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary.setdefault("cuda_tests", {"status": "pending", "seconds": 0})
    summary.setdefault("formats", {})
    summary.setdefault("comfyui", {"status": "pending"})
    with atomic_path(os.path.join(out_dir, "summary.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    with atomic_path(os.path.join(out_dir, "summary.md")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(markdown(summary))


if __name__ == "__main__":
    sys.exit(main())
