"""The built wheel, used from outside the checkout: every package of uniar_backend is in it, and its `uniar`
command quantises a checkpoint and generates from the quantised folder (the wheel once lacked uniar_backend.quant,
so an installed `uniar` could neither quantise nor load a quantised folder)."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, ckpt_path


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    wheels, site, src = base / "dist", base / "site", base / "src"
    # built from a copy of what the sdist holds, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(os.path.join(ROOT, "uniar_backend"), src / "uniar_backend",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600,
                           cwd=str(base))
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = [w for w in os.listdir(wheels) if w.endswith(".whl")]
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheels / wheel)], capture_output=True, text=True, timeout=600, cwd=str(base))
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return base, wheels / wheel, site


def test_wheel_holds_every_package(installed):
    _, wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    packages = sorted(os.path.relpath(d, ROOT).replace(os.sep, "/") for d, _, fs in os.walk(
        os.path.join(ROOT, "uniar_backend")) if "__init__.py" in fs)
    assert "uniar_backend/quant" in packages
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, f"{pkg} is not in the wheel"
    source = sorted(os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                    for d, _, fs in os.walk(os.path.join(ROOT, "uniar_backend")) for f in fs if f.endswith(".py"))
    assert [n for n in source if n not in names] == []
    assert not any(n.startswith(("nodes/", "tests/", "web/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_quantises_and_generates_outside_the_checkout(installed):
    base, _, site = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the installed copy only: the run starts outside the checkout
    uniar = site / "bin" / "uniar"
    assert uniar.is_file()
    where = subprocess.run([sys.executable, "-c", "import uniar_backend, uniar_backend.quant.convert as c; "
                            "print(uniar_backend.__file__)"], capture_output=True, text=True, env=env, cwd=str(base))
    assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    q = base / "tiny-int4"
    r = subprocess.run([sys.executable, str(uniar), "quantize", "--model", ckpt_path("uniar-tiny"), "--format",
                        "int4", "--out", str(q)], capture_output=True, text=True, env=env, cwd=str(base), timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(uniar), "generate", "--model", str(q), "--prompt", "a red cube",
                        "--height", "64", "--width", "64", "--device", "cpu", "--out", str(base / "t.safetensors")],
                       capture_output=True, text=True, env=env, cwd=str(base), timeout=600)
    assert r.returncode == 0, r.stderr
    assert (base / "t.safetensors").stat().st_size > 0
