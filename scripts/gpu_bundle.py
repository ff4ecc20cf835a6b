#!/usr/bin/env python3
"""Gather what a lent GPU machine needs for ``scripts/gpu_check.sh`` into ``.gpu_bundle/`` (git-ignored).

The device machine has torch, transformers, accelerate, safetensors, tokenizers, huggingface_hub, pillow, numpy and
aiohttp, reaches no network, and receives the checkout plus the carried folders: 64 MiB in all.  This script packs,
in order of importance, until that budget is spent:

1. the fixtures the CUDA correctness tests read (``shared/fixtures``: the two tiny checkpoints and their goldens;
   the device gets no ``../shared``; ``gpu_check.sh`` points ``UNIAR_SHARED`` at the bundle's copy);
2. wheels the pack's phases need and the device lacks (pytest and its plugins' needs, diffusers);
3. a trimmed ComfyUI tree (``COMFYUI_PATH``, the newest runnable release: 0.33) for the ComfyUI phase;
4. wheels ComfyUI needs at start-up that the device lacks, small ones first.

What does not fit (or cannot be carried at all: torchvision / torchaudio must match the device's own torch build)
is left out and listed in ``.gpu_bundle/MANIFEST.json`` and on stdout, with its size and the reason; the GPU
check's ComfyUI phase then says which modules it missed.  Binary wheels are fetched for each ``--python`` version
(default: this interpreter's), manylinux x86_64.

    python scripts/gpu_bundle.py [--comfyui DIR] [--python 3.11,3.12] [--budget-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, ".gpu_bundle")
# what the device machine already has (and what comes with those packages)
# (torch's, transformers' and aiohttp's own requirements come with them; requests does not with transformers 5 and
# huggingface_hub 1.x, so it travels: gpu_check.sh installs only the bundled wheels the interpreter lacks)
ON_DEVICE = {"torch", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface-hub", "pillow",
             "numpy", "aiohttp", "jinja2", "markupsafe", "filelock", "fsspec", "packaging", "pyyaml", "regex",
             "tqdm", "typing-extensions", "sympy", "networkx", "psutil", "yarl", "multidict", "aiosignal",
             "frozenlist", "attrs", "mpmath", "propcache", "aiohappyeyeballs"}
# wheels for the pack's phases (pytest for the CUDA tests, diffusers and what it imports for the decoder), all pure
PACK_WHEELS = ["pytest", "pluggy", "iniconfig", "diffusers", "importlib-metadata", "zipp", "requests", "urllib3",
               "idna", "certifi", "charset-normalizer"]
# ComfyUI 0.33's start-up needs beyond the device's, small first; the frontend is not needed (the phase talks to
# the API only and starts ComfyUI with an empty --front-end-root)
COMFY_WHEELS = ["einops", "torchsde", "trampoline", "simpleeval", "alembic", "mako", "sentencepiece", "blake3",
                "pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection",
                "python-dotenv", "greenlet", "sqlalchemy", "spandrel", "kornia", "kornia-rs", "comfy-aimdo",
                "comfy-kitchen", "pyopengl", "av", "scipy"]
NEVER = {"torchvision": "must match the device's own torch build (not known here)",
         "torchaudio": "must match the device's own torch build (not known here)",
         "comfyui-frontend-package": "not needed: the phase uses the API with an empty --front-end-root",
         "comfyui-workflow-templates": "not needed for the API", "comfyui-embedded-docs": "not needed for the API"}
COMFY_SKIP = {".git", ".github", "tests", "tests-unit", "output", "input", "models", "custom_nodes", "user",
              "blueprints", "temp", "__pycache__", "script_examples", "notebooks"}


def size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def checkout_size() -> int:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum(os.path.getsize(os.path.join(ROOT, f)) for f in files if f and os.path.isfile(os.path.join(ROOT, f)))


def fetch_wheel(name: str, dest: str, pythons: list[str], offline: bool = False) -> tuple[list[str], str | None]:
    """-> (wheel paths, error): the wheel of ``name`` (pure, or one per Python version for binary ones)."""
    got: list[str] = []
    if offline:
        return got, "not fetched (--offline)"
    for i, py in enumerate(pythons):
        tmp = tempfile.mkdtemp(prefix="uniar-whl-")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
               "--python-version", py, "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", name]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return got, (p.stderr.strip().splitlines() or ["pip download failed"])[-1][:200]
        for fn in os.listdir(tmp):
            if not os.path.exists(os.path.join(dest, fn)):
                shutil.move(os.path.join(tmp, fn), os.path.join(dest, fn))
            got.append(os.path.join(dest, fn))
        shutil.rmtree(tmp, ignore_errors=True)
        if all(fn.endswith("-none-any.whl") for fn in map(os.path.basename, got)) and i == 0:
            break  # pure Python: one wheel serves every version
    return got, None


def copy_fixtures(src: str, dst: str) -> None:
    """The two tiny checkpoints and their float32 goldens (the bf16 goldens are for other tests)."""
    fx = os.path.join(src, "fixtures")
    out = os.path.join(dst, "fixtures")
    for name in ("uniar-tiny", "uniar-tiny-bsq64"):
        shutil.copytree(os.path.join(fx, name), os.path.join(out, name))
        shutil.copytree(os.path.join(fx, "golden", name), os.path.join(out, "golden", name))
    for fn in os.listdir(os.path.join(fx, "golden")):
        if os.path.isfile(os.path.join(fx, "golden", fn)):
            shutil.copy(os.path.join(fx, "golden", fn), os.path.join(out, "golden", fn))


def copy_comfyui(src: str, dst: str) -> None:
    def ignore(folder, names):
        top = os.path.abspath(folder) == os.path.abspath(src)
        return {n for n in names if (top and n in COMFY_SKIP) or n in ("__pycache__", ".git")}
    shutil.copytree(src, dst, ignore=ignore, symlinks=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI tree (default $COMFYUI_PATH)")
    p.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="Python versions of the binary wheels, comma separated (default: this interpreter's)")
    p.add_argument("--budget-mib", type=float, default=64, help="checkout + bundle limit in MiB (default 64)")
    p.add_argument("--offline", action="store_true", help="fetch no wheels (pack the fixtures and ComfyUI only)")
    p.add_argument("--out", default=BUNDLE, help=argparse.SUPPRESS)  # tests: another folder
    p.add_argument("--shared", default=os.environ.get("UNIAR_SHARED", os.path.join(os.path.dirname(ROOT), "shared")))
    a = p.parse_args(argv)
    pythons = [v for v in a.python.split(",") if v]
    budget = int(a.budget_mib * 2**20)
    bundle = os.path.abspath(a.out)
    shutil.rmtree(bundle, ignore_errors=True)
    wheels = os.path.join(bundle, "wheels")
    os.makedirs(wheels)
    manifest = {"budget_bytes": budget, "python": pythons, "included": [], "left_out": []}
    used = checkout_size()
    manifest["checkout_bytes"] = used

    def take(kind: str, name: str, paths: list[str], reason_if_big: str = "over the 64 MiB budget") -> bool:
        nonlocal used
        n = sum(size_of(x) for x in paths)
        if used + n > budget:
            for x in paths:
                shutil.rmtree(x, ignore_errors=True) if os.path.isdir(x) else os.remove(x)
            manifest["left_out"].append({"kind": kind, "name": name, "bytes": n, "reason": reason_if_big})
            return False
        used += n
        manifest["included"].append({"kind": kind, "name": name, "bytes": n})
        return True

    fx = os.path.join(bundle, "shared")
    copy_fixtures(a.shared, fx)
    take("fixtures", "shared/fixtures (tiny checkpoints + float32 goldens)", [fx])
    for name in PACK_WHEELS:
        got, err = fetch_wheel(name, wheels, pythons, a.offline)
        if err:
            manifest["left_out"].append({"kind": "wheel", "name": name, "bytes": 0, "reason": err})
        else:
            take("wheel", name, got)
    if a.comfyui and os.path.isfile(os.path.join(a.comfyui, "main.py")):
        # ComfyUI only as a whole: the tree is no use without every wheel it needs at start-up
        tree = os.path.join(bundle, "comfyui")
        copy_comfyui(a.comfyui, tree)
        staged = tempfile.mkdtemp(prefix="uniar-comfy-whl-")
        parts, errors = {}, []
        for name in COMFY_WHEELS:
            got, err = fetch_wheel(name, staged, pythons, a.offline)
            parts[name] = got
            if err:
                errors.append(f"{name}: {err}")
        need = size_of(tree) + sum(size_of(x) for got in parts.values() for x in got)
        if errors or used + need > budget:
            why = ("; ".join(errors) if errors else
                   f"ComfyUI's tree and start-up wheels take {need / 2**20:.1f} MiB, the budget leaves "
                   f"{(budget - used) / 2**20:.1f} MiB")
            shutil.rmtree(tree, ignore_errors=True)
            manifest["left_out"].append({"kind": "comfyui", "name": f"ComfyUI tree {a.comfyui} (trimmed)",
                                         "bytes": need, "reason": why})
            for name, got in parts.items():
                manifest["left_out"].append({"kind": "wheel", "name": name,
                                             "bytes": sum(size_of(x) for x in got), "reason": "part of ComfyUI"})
        else:
            take("comfyui", f"ComfyUI tree {a.comfyui} (trimmed)", [tree])
            for name, got in parts.items():
                moved = [shutil.move(x, os.path.join(wheels, os.path.basename(x))) for x in got]
                take("wheel", name, moved)
        shutil.rmtree(staged, ignore_errors=True)
    else:
        manifest["left_out"].append({"kind": "comfyui", "name": "ComfyUI tree", "bytes": 0,
                                     "reason": "no --comfyui / COMFYUI_PATH given"})
    for name, why in NEVER.items():
        manifest["left_out"].append({"kind": "wheel", "name": name, "bytes": 0, "reason": why})
    manifest["total_bytes"] = used
    with open(os.path.join(bundle, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    print(f"{bundle}: checkout {manifest['checkout_bytes'] / 2**20:.1f} MiB + bundle "
          f"{(used - manifest['checkout_bytes']) / 2**20:.1f} MiB = {used / 2**20:.1f} of {a.budget_mib:g} MiB")
    for x in manifest["left_out"]:
        print(f"  left out: {x['name']} ({x['bytes'] / 2**20:.1f} MiB): {x['reason']}")
    print("carry it with the run: carry=['.gpu_bundle']; command: bash scripts/gpu_check.sh --out $OUT/gpu_check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
