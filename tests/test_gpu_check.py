"""The one-command GPU check, run as CI runs it: `bash scripts/gpu_check.sh --cpu-dry-run --out DIR` executes every
phase on this CPU at reduced sizes and writes the summary a GPU run writes (so its command, arguments and JSON
cannot break unnoticed before a GPU is lent)."""

import json
import os
import subprocess

import pytest
from conftest import FIXTURES, ROOT

from uniar_backend.tools import gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "COMFYUI_PYTHON")}
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu-dry-run", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return p, out


def test_dry_run_writes_the_summary(dry_run):
    p, out = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.load(open(out / "summary.json"))
    assert {"environment", "cuda_tests", "formats", "comfyui"} <= set(s) and s["cpu_dry_run"] is True
    env = s["environment"]
    assert env["torch"] and "flash_attn" in env and env["cuda_available"] in (True, False)
    ct = s["cuda_tests"]
    assert ct["status"] == "ok" and ct["device"] == "cpu" and ct["tests"] > 0 and ct["failed"] == 0
    assert ct["passed"] > 0, ct["cases"]
    assert set(s["formats"]) == {"bf16", "int8", "fp8", "int4"}
    for fmt, r in s["formats"].items():
        assert r["status"] == "ok", (fmt, r["output_tail"])
        res = r["result"]
        assert res["weights"] == fmt and res["shrink"] == 32
        assert res["ar"]["fast"]["ms_per_step"] > 0 and res["dit_ms_per_step"] > 0 and res["vae_ms"] > 0
        assert (fmt == "bf16") == ("ar_layers_quantised" not in res)
    assert s["comfyui"]["status"] == "skipped" and "COMFYUI_PATH" in s["comfyui"]["reason"]
    md = (out / "summary.md").read_text()
    assert "| int4 | ok |" in md and "CUDA correctness" in md and "ComfyUI budgets" in md
    for f in ("cuda_tests.log", "cuda_tests.xml", "format_int8.log"):
        assert (out / f).is_file()


def test_a_failing_phase_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    """A phase that fails (here: a format the bench cannot run, forced by a broken interpreter path) is recorded with
    its output, the others still run, and the exit status says so."""
    real = gpu_check.run_phase
    calls = []

    def fake(cmd, timeout, env=None, log=None):
        calls.append(cmd)
        if "int8" in cmd:
            return real(["false"], timeout, env, log)
        return {"status": "ok", "seconds": 0.0, "returncode": 0,
                "output_tail": json.dumps({"weights": cmd[cmd.index("--weights") + 1], "ar": {}})}
    monkeypatch.setattr(gpu_check, "run_phase", fake)
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--skip", "cuda_tests,comfyui"])
    s = json.load(open(tmp_path / "summary.json"))
    assert rc == 1 and s["formats"]["int8"]["status"] == "failed"
    assert [s["formats"][f]["status"] for f in ("bf16", "fp8", "int4")] == ["ok"] * 3
    assert s["cuda_tests"]["status"] == "skipped" and len(calls) == 4


def test_arguments_are_checked():
    for bad in (["--out", "x", "--formats", "nf4"], ["--out", "x", "--budgets", "8GB"], ["--out", "x", "--skip", "y"],
                []):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_without_a_gpu_the_real_run_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2


def test_bundle_packs_by_importance_within_the_budget(tmp_path):
    """scripts/gpu_bundle.py (offline here: no wheels fetched): the fixtures the CUDA tests read go first, what does
    not fit the budget is left out and listed with its size and reason, and the folder is git-ignored."""
    import sys

    def bundle(mib):
        out = tmp_path / f"b{mib}"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_bundle.py"), "--offline",
                            "--budget-mib", str(mib), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"})
        assert p.returncode == 0, p.stderr
        return out, json.load(open(out / "MANIFEST.json")), p.stdout

    out, m, text = bundle(64)
    assert [x["kind"] for x in m["included"]] == ["fixtures"] and m["total_bytes"] <= 64 * 2**20
    fx = out / "shared" / "fixtures"
    for rel in ("uniar-tiny/config.json", "uniar-tiny-bsq64/model.safetensors", "golden/test_image.png"):
        assert (fx / rel).is_file(), rel
    for name in ("uniar-tiny", "uniar-tiny-bsq64"):  # the float32 goldens, whole
        assert sorted(os.listdir(fx / "golden" / name)) == sorted(os.listdir(
            os.path.join(FIXTURES, "golden", name)))
    assert any(x["name"] == "torchvision" for x in m["left_out"]) and "left out: pytest" in text
    out, m, text = bundle(5)  # the fixtures do not fit: left out and said so, nothing half-copied
    assert m["included"] == [] and not (out / "shared").exists()
    assert any(x["kind"] == "fixtures" and x["reason"].startswith("over") for x in m["left_out"])
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu_bundle/x"], cwd=ROOT)
    assert ignored.returncode == 0


def test_the_deadline_cuts_phases_and_says_so(tmp_path):
    """--deadline bounds the whole run (default 470 s, under 8 minutes): a phase with no time left is skipped with
    the reason, not started."""
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--skip", "cuda_tests", "--deadline", "1",
                         "--formats", "bf16,int4"])
    s = json.load(open(tmp_path / "summary.json"))
    assert rc == 0 and {r["status"] for r in s["formats"].values()} == {"skipped"}
    assert all("out of time" in r["reason"] for r in s["formats"].values())
    assert gpu_check.parse_args(["--out", "x"]).deadline == 470
