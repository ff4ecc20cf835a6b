import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED = os.environ.get("UNIAR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
FIXTURES = os.path.join(SHARED, "fixtures")
GOLDEN = os.path.join(FIXTURES, "golden")
TEST_IMAGE = os.path.join(GOLDEN, "test_image.png")
CKPTS = ["uniar-tiny", "uniar-tiny-bsq64"]

if not os.path.isdir(FIXTURES):
    raise RuntimeError(f"the shared fixtures are missing: expected {FIXTURES} (set UNIAR_SHARED)")

# The goldens were made with one CPU thread; results do not depend on it, but keep runs reproducible and light.
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Parameters of the golden steps (from the golden README / manifest).
GEN_CASES = {
    "b1_t2i_64x64_cfg1.5": dict(prompt="A red cube on a blue table.", height=64, width=64, cfg=1.5, seed=1234, edit=False),
    "b3_t2i_96x128_cfg1.5": dict(prompt="A cat sitting on a wooden chair next to a window.", height=96, width=128,
                                 cfg=1.5, seed=4321, edit=False),
    "c1_edit_64x64_cfg1.5": dict(prompt="Make the sky purple.", height=64, width=64, cfg=1.5, seed=777, edit=True),
}


def ckpt_path(name):
    return os.path.join(FIXTURES, name)


def golden(name, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(GOLDEN, name, f"{step}.safetensors"))


_MODELS = {}


def load_model(name, components=("llm", "vision", "lm_head", "gen_head"), dtype="float32", attention="sdpa"):
    """Models are cached per test session (loading is cheap, but the suite re-uses them a lot)."""
    from uniar_backend.loader import Checkpoint

    key = (name, tuple(components), dtype, attention)
    if key not in _MODELS:
        ck = Checkpoint(ckpt_path(name))
        _MODELS[key] = (ck, ck.load_ar(components=components, device="cpu", dtype=dtype, attention=attention))
    return _MODELS[key]


@pytest.fixture(params=CKPTS)
def ckpt_name(request):
    return request.param


def run_cli(*args, check=True, subprocess_=False):
    """Run ``python -m uniar_backend ARGS``.  By default in this process through ``uniar_backend.cli.main`` (the
    same code path, without paying the interpreter + torch import again); ``subprocess_=True`` runs the real
    ``python -m`` entry point."""
    import contextlib
    import io
    import subprocess
    import types

    argv = [str(a) for a in args]
    if subprocess_:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "uniar_backend", *argv], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
    else:
        from uniar_backend.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 2
        proc = types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}): {proc.stderr}")
    return proc


def run_cli_stderr(args, tty: bool):
    """``python -m uniar_backend ARGS`` in a subprocess with its stderr on a pseudo-terminal (``tty``) or a pipe;
    returns (exit status, stderr).  For the progress bars, which only a terminal gets."""
    import pty
    import subprocess

    env = dict(os.environ, PYTHONPATH=ROOT, COLUMNS="120")
    argv = [sys.executable, "-m", "uniar_backend", *[str(a) for a in args]]
    if tty:
        master, slave = pty.openpty()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        p.wait(timeout=300)
        os.close(master)
        return p.returncode, b"".join(chunks).decode("utf-8", "replace")
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return r.returncode, r.stderr
