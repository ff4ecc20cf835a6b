"""The benchmark script runs at tiny size and prints the documented JSON (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_KEYS = {"mode", "steps", "ms_per_step_first32", "ms_per_step_last32", "seconds_per_image", "peak_rss_mb"}


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "uniar_backend.bench", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_bench_json_schema_tiny():
    out = _run("--tiny", "--steps", "8", "--repeats", "1", "--json")
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    runs, summary = lines[:-1], lines[-1]
    assert sorted(r["mode"] for r in runs) == ["fast", "reference"]
    for r in runs:
        assert RUN_KEYS <= set(r)
        assert r["steps"] == 8
        for k in RUN_KEYS - {"mode", "steps"}:
            assert isinstance(r[k], (int, float)) and r[k] >= 0
    assert summary["summary"] is True
    assert summary["steps"] == 8
    assert isinstance(summary["ratio"], (int, float)) and summary["ratio"] > 0
    assert summary["tokens_identical"] is True
    assert summary["cpu_warm"] == "auto"


def test_bench_text_output_two_repeats():
    out = _run("--tiny", "--steps", "6", "--repeats", "2", "--cpu-warm", "on")
    assert "ratio reference/fast" in out and "tokens identical: True" in out
    assert out.count("fast      repeat") == 2 and out.count("reference repeat") == 2


def test_bench_in_process_helpers():
    from uniar_backend.tools import bench

    a = bench.parse_args(["--steps", "12"])
    assert a.steps == 12 and a.repeats == 3 and a.device == "cpu" and not a.json
    assert bench.window_ms([0.5, 0.6, 0.7, 0.8, 0.9], True) == pytest.approx(100.0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_real_size_refuses_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from uniar_backend.tools import bench

    assert bench.main(["--real-size"]) == 2


def test_real_size_phases_shrunk_on_cpu():
    """--real-size at reduced size (hidden --shrink) on the CPU: every phase runs and reports its numbers."""
    out = _run("--real-size", "--shrink", "32", "--device", "cpu", "--ar-steps", "4", "--ref-steps", "2",
               "--decode-steps", "2", "--json")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["real_size"] is True and res["shrink"] == 32
    for k in ("copy_bandwidth_gbs", "matmul_tflops", "ar_floor_ms", "dit_ms_per_step", "dit_tflop_per_step",
              "dit_peak_mb", "vae_ms", "end_to_end_seconds"):
        assert k in res
    assert set(res["ar"]) == {"fast", "reference"}
    assert res["ar"]["fast"]["steps"] == 4 and res["ar"]["reference"]["steps"] == 2
    assert res["weights"] == "bf16" and "ar_layers_quantised" not in res
    assert res["ar_batch"]["steps"] == 4 and set(res["ar_batch"]["images_per_min"]) == {"1", "4", "8"}
    assert set(res["ar_batch"]["batch_speedup"]) == {"4", "8"}


def test_real_size_weight_format_shrunk_on_cpu():
    """--weights int4: the AR and DiT target layers are quantised before timing (the per-format speed table)."""
    out = _run("--real-size", "--shrink", "32", "--device", "cpu", "--ar-steps", "4", "--ref-steps", "2",
               "--decode-steps", "2", "--weights", "int4", "--json")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["weights"] == "int4" and res["ar_layers_quantised"] > 0 and res["dit_layers_quantised"] > 0
    assert res["ar"]["fast"]["ms_per_step"] > 0 and res["end_to_end_seconds"] > 0


def test_batch_throughput_json_tiny():
    out = _run("--tiny", "--steps", "4", "--repeats", "2", "--batch-size", "2,3", "--json")
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    runs, summary = lines[:-1], lines[-1]
    assert sorted((r["batch_size"], r["repeat"]) for r in runs) == [(b, r) for b in (1, 2, 3) for r in (0, 1)]
    assert all(r["images_per_min"] > 0 and r["seconds"] > 0 for r in runs)
    assert summary["summary"] is True and summary["steps"] == 4
    assert set(summary["images_per_min"]) == {"1", "2", "3"} and set(summary["batch_speedup"]) == {"2", "3"}
    assert all(v > 0 for v in summary["batch_speedup"].values())
    assert summary["tokens_equal_alone"]["1"] == 1.0  # batch 1 redraws each prompt alone exactly
    assert all(0 <= v <= 1 for v in summary["tokens_equal_alone"].values())


def test_batch_size_is_checked():
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "uniar_backend.bench", "--batch-size", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--batch-size sizes must be in 1..64" in p.stderr
