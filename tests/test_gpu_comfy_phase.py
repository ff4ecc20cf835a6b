"""scripts/gpu_comfy_phase.py: the real-size checkpoint writer (shrunk, on the CPU) against the pack's own loaders,
the memory poller, the workflow edits; the whole CPU dry run through a real ComfyUI when ``COMFYUI_PATH`` is set."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_comfy_phase.py")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable


def _phase():
    spec = importlib.util.spec_from_file_location("gpu_comfy_phase", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


phase = _phase()


@pytest.fixture(scope="module", params=["int4", "int8"])
def written(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("rs") / f"ckpt-{request.param}")
    info = phase.write_real_size(folder, request.param, device="cpu", shrink=32, prompt_dtype="float32")
    return folder, request.param, info


def test_writer_layout_is_what_the_loaders_read(written):
    from uniar_backend.api import UniAR
    from uniar_backend.decoder import load_decoder
    from uniar_backend.loader import Checkpoint

    folder, fmt, info = written
    assert info["format"] == fmt and info["bytes"] > 0
    ck = Checkpoint(folder)
    assert ck.weight_format == fmt
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["uniar_quantization"]["format"] == fmt  # as the converter records it
    model = ck.load_ar(device="cpu", dtype="float32")
    assert model.weight_format == fmt
    # no text encoders: the decoder prompt comes from the cache the writer seeded
    assert not os.path.exists(os.path.join(folder, "sd3_pipeline", "text_encoder"))
    dec = load_decoder(folder, device="cpu", dtype="float32")
    assert dec.transformer.weight_format == fmt
    # it runs: a few AR tokens at 32x32, one decoder step, finite pixels
    uni = UniAR(ck, model)
    tokens = uni.generate(["a red cube"], 32, 32, cfg=1.0, seed=0)
    img = dec.decode(tokens, steps=1, guidance=1.0, upsampling_ratio=1.0, seed=0)
    assert img.shape[-1] == 3 and bool(torch.isfinite(img).all())


def test_writer_matches_the_real_sizes_on_meta():
    """shrink 1 builds the real layouts (meta only: nothing is written here)."""
    from uniar_backend.decoder.memory import SD35M_TRANSFORMER

    raw = phase.real_ar_config(1)
    assert raw["text_config"]["hidden_size"] == 4096 and raw["text_config"]["num_hidden_layers"] == 36
    assert raw["image_token_id"] == 650  # the fixture tokenizer's id (its files are copied)
    t, v = phase.real_decoder_configs(1)
    for k in ("num_layers", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
        assert t[k] == SD35M_TRANSFORMER[k]
    assert t["siglip_channels"] == 4 * 1152 and v["block_out_channels"] == [128, 256, 512, 512]


def test_budget_format_and_poller():
    assert phase.budget_format(8) == "int4" and phase.budget_format(12) == "int8"
    with phase.PeakPoller(os.getpid(), "rss", interval=0.05) as p:
        x = bytearray(64 << 20)  # noqa: F841
        import time

        time.sleep(0.2)
    assert p.samples >= 2 and p.peak > 64 << 20
    v, src = phase.gpu_used_bytes(os.getpid())  # no nvidia-smi here: None; on a GPU machine a number
    assert (v is None and src == "none") or isinstance(v, int)


def test_second_model_workflow_links():
    wf = phase.t2i_workflow("a", gpu=True)
    gen = next(n for n in wf.values() if n["class_type"] == "UniARGenerate")
    dec = next(n for n in wf.values() if n["class_type"] == "UniARDecode")
    assert (gen["inputs"]["width"], gen["inputs"]["height"], dec["inputs"]["upsampling_ratio"]) == (512, 512, 2.0)
    cap = {"c" + k: phase._renumber(v, "c") for k, v in phase.caption_workflow("b").items()}
    for node in cap.values():
        for v in node["inputs"].values():
            if isinstance(v, list):
                assert v[0] in cap


@pytest.mark.skipif(not COMFYUI_PATH, reason="the dry run through ComfyUI needs COMFYUI_PATH (and COMFYUI_PYTHON)")
def test_cpu_dry_run_through_comfyui(tmp_path):
    p = subprocess.run([COMFYUI_PYTHON, SCRIPT, "--comfyui", COMFYUI_PATH, "--out", str(tmp_path), "--budgets", "8",
                        "--cpu-dry-run"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0, (res, p.stderr[-3000:])
    assert res["status"] == "ok" and res["memory"] == "rss"
    run = res["runs"][0]
    assert run["format"] == "int4" and run["under_budget"] is None and run["peak_rss_gb"] > 0
    assert run["second_model"]["status"] == "ok"
    assert run["second_model"]["first_model_released_meanwhile"] is False
