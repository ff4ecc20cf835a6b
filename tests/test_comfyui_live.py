"""The pack inside a real ComfyUI (CPU, loopback only), on the fixture checkpoints.

Runs only when ``COMFYUI_PATH`` points at a ComfyUI source tree; ``COMFYUI_PYTHON`` may name an interpreter with
ComfyUI's requirements and this pack's (default: the one running pytest).  Run it once per ComfyUI release
(0.3.64 and 0.28.0; docs/comfyui.md has the set-up)::

    COMFYUI_PATH=~/comfy28 COMFYUI_PYTHON=~/comfy28/venv/bin/python python -m pytest -q tests/test_comfyui_live.py

Checks: the pack imports (no IMPORT FAILED), every node is in /object_info with tooltips, the templates and their
thumbnails are served, every API workflow in tests/comfy_api runs (image sizes, non-empty text, token files),
generated tokens equal the CLI's for the same seed and inputs, unchanged workflows are cached and a changed seed
re-runs, a cancel in the middle of a generation interrupts it and the next run works, bad inputs give one error
each, "free model and node cache" releases the pack's models, and -- on releases with dynamic VRAM (0.28+) --
every workflow runs with ComfyUI's layers built the way dynamic VRAM builds them (lazy weights; simulated on the
CPU by ../shared/tools/sim_dynamic_vram.py).
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_server import (API_DIR, FIXTURE_CKPTS, INPUT_IMAGE_NAME, PACK_DIR_NAME, ROOT,  # noqa: E402
                            SIM_DYNAMIC_VRAM, execution_error, live_server, load_api_workflow,
                            skip_without_dynamic_vram)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH,
    reason="live ComfyUI tests need COMFYUI_PATH=<ComfyUI source tree> (and COMFYUI_PYTHON=<its interpreter>)",
)

NODE_IDS = ["UniARModelLoader", "UniARDownloadModel", "UniAREncodeImage", "UniARGenerate", "UniARDecode",
            "UniARCaption", "UniARSaveTokens", "UniARLoadTokens", "UniARPreviewTokens", "UniARDecoderLoader",
            "UniARTokensToConditioning", "UniAREmptyLatent", "UniARReferenceNoise", "UniARReferenceSigmas"]
WORKFLOWS = sorted(f[:-5] for f in os.listdir(API_DIR) if f.endswith(".json"))


@pytest.fixture(scope="module")
def server():
    yield from live_server(COMFYUI_PATH, COMFYUI_PYTHON)


@pytest.fixture(scope="module")
def dynamic_vram_server():
    """ComfyUI with comfy.ops layers built as under dynamic VRAM (weights created lazily on load), on the CPU."""
    skip_without_dynamic_vram(COMFYUI_PATH)
    yield from live_server(COMFYUI_PATH, COMFYUI_PYTHON, [SIM_DYNAMIC_VRAM])


def with_ckpt(wf: dict, ckpt: str) -> dict:
    wf = copy.deepcopy(wf)
    for node in wf.values():
        if node["class_type"] == "UniARModelLoader":
            node["inputs"]["ckpt_name"] = ckpt
    return wf


def outputs_of(entry: dict, key: str) -> list:
    items = []
    for node_id, out in entry.get("outputs", {}).items():
        for it in out.get(key, []):
            items.append((node_id, it))
    return items


def image_size(server, item) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(server.view(item))) as im:
        return im.size


def assert_success(server, entry):
    status = entry.get("status", {})
    err = execution_error(entry)
    assert status.get("status_str") == "success", f"workflow failed: {err}\n{server.log_tail()}"


# ------------------------------------------------------------------------------------------------ loading
def test_pack_imports_and_nodes_have_tooltips(server):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, log
    code, info = server.get("/object_info")
    assert code == 200
    for nid in NODE_IDS:
        assert nid in info, f"{nid} missing from /object_info"
        d = info[nid]
        assert d["category"].startswith("UniAR"), d["category"]
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{nid}.{name} has no tooltip"
        assert all(d["output_tooltips"]), f"{nid} has an output without tooltip"
    opts = info["UniARModelLoader"]["input"]["required"]["ckpt_name"][1]["options"]
    assert set(FIXTURE_CKPTS) <= set(opts), opts  # folders from extra_model_paths.yaml, listed by name
    seed = info["UniARGenerate"]["input"]["required"]["seed"][1]
    assert seed.get("control_after_generate") and seed["max"] == 2**64 - 1


def test_templates_are_served(server):
    code, templates = server.get("/workflow_templates")
    assert code == 200
    names = templates.get(PACK_DIR_NAME, [])
    folder = os.path.join(ROOT, "example_workflows")
    expected = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
    assert sorted(names) == expected and len(expected) >= 5, templates
    import urllib.parse

    for name in names:  # the workflow and its thumbnail, at the URLs the frontend asks for
        base = f"/api/workflow_templates/{PACK_DIR_NAME}/{urllib.parse.quote(name)}"
        code, wf = server.get(base + ".json")
        assert code == 200 and "nodes" in wf, (name, code)
        code, jpg = server._request(base + ".jpg")
        assert code == 200 and jpg[:3] == b"\xff\xd8\xff", (name, code)


# ------------------------------------------------------------------------------------------------ workflows
@pytest.mark.parametrize("ckpt", FIXTURE_CKPTS)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_runs(server, name, ckpt):
    wf = with_ckpt(load_api_workflow(name), ckpt)
    entry = server.run(wf, timeout=600)
    assert_success(server, entry)
    images = outputs_of(entry, "images")
    texts = outputs_of(entry, "text")
    tokens = outputs_of(entry, "uniar_tokens")
    # every SaveImage / caption / token node of the workflow produced its output
    for nid, node in wf.items():
        ct = node["class_type"]
        if ct == "SaveImage":
            got = [it for n, it in images if n == nid]
            assert got, f"{name}: SaveImage {nid} wrote nothing"
            src = wf[node["inputs"]["images"][0]]
            w, h = image_size(server, got[0])
            if src["class_type"] == "UniARDecode":
                gen = wf[src["inputs"]["tokens"][0]]
                if gen["class_type"] == "UniARGenerate" and gen["inputs"]["aspect_ratio"].startswith("custom"):
                    r = src["inputs"]["upsampling_ratio"]
                    assert (w, h) == (round(gen["inputs"]["width"] * r), round(gen["inputs"]["height"] * r))
                assert w % 16 == 0 and h % 16 == 0
            if src["class_type"] == "VAEDecode":  # the native route: the latent's size x 8
                lat = wf[wf[src["inputs"]["samples"][0]]["inputs"]["latent_image"][0]]
                gen = wf[lat["inputs"]["tokens"][0]]["inputs"]
                r = lat["inputs"]["upsampling_ratio"]
                assert (w, h) == (round(gen["width"] * r), round(gen["height"] * r))
        elif ct == "UniARCaption":
            got = [it for n, it in texts if n == nid]
            assert got and got[0].strip(), f"{name}: caption {nid} is empty"
        elif ct == "UniARSaveTokens":
            got = [it for n, it in tokens if n == nid]
            assert got and os.path.getsize(server.output_path(got[0])) > 0


def _run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([COMFYUI_PYTHON, "-m", "uniar_backend", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _load_tokens(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("indices"), f.metadata()


@pytest.mark.parametrize("ckpt", FIXTURE_CKPTS)
@pytest.mark.parametrize("name", ["text_to_image", "edit_image"])
def test_tokens_equal_cli(server, name, ckpt, tmp_path):
    wf = with_ckpt(load_api_workflow(name), ckpt)
    entry = server.run(wf, timeout=600)
    assert_success(server, entry)
    (nid, item), = outputs_of(entry, "uniar_tokens")
    ours, meta = _load_tokens(server.output_path(item))
    gen = wf[wf[nid]["inputs"]["tokens"][0]]["inputs"]
    args = ["generate", "--model", os.path.join(server.base, "uniar_models", ckpt), "--prompt", gen["prompt"],
            "--height", gen["height"], "--width", gen["width"], "--cfg", gen["cfg"], "--temperature",
            gen["temperature"], "--seed", gen["seed"], "--batch-size", gen["batch_size"], "--out",
            tmp_path / "cli.safetensors", "--device", "cpu"]
    if "edit_image" in gen:
        args += ["--image", os.path.join(server.base, "input", INPUT_IMAGE_NAME)]
    _run_cli(*args)
    cli, cli_meta = _load_tokens(tmp_path / "cli.safetensors")
    assert ours.shape == cli.shape and bool((ours == cli).all()), "ComfyUI tokens differ from the CLI's"
    assert meta["ar_height"] == cli_meta["ar_height"] and meta["ar_width"] == cli_meta["ar_width"]


def test_cache_and_seed(server):
    wf = load_api_workflow("text_to_image")
    first = server.run(wf)
    assert_success(server, first)
    again = server.run(wf)
    assert_success(server, again)
    cached = [d for ev, d in again["status"]["messages"] if ev == "execution_cached"]
    assert cached and {"1", "2", "3"} <= set(cached[0]["nodes"]), "unchanged nodes were not cached"
    wf2 = copy.deepcopy(wf)
    wf2["2"]["inputs"]["seed"] = 4321
    third = server.run(wf2)
    assert_success(server, third)
    cached3 = [d for ev, d in third["status"]["messages"] if ev == "execution_cached"]
    assert "2" not in (cached3[0]["nodes"] if cached3 else []), "a changed seed did not re-run Generate"


# ------------------------------------------------------------------------------------------------ cancel
def test_cancel_mid_generation_then_next_run_works(server):
    wf = load_api_workflow("text_to_image")
    big = copy.deepcopy(wf)
    g = big["2"]["inputs"]
    # 4096 AR steps: several seconds even for the tiny model with the fast sampler, so the cancel lands mid-run
    g.update(width=2048, height=2048, seed=31337)
    big["3"]["inputs"]["steps"] = 1
    code, resp = server.queue(big)
    assert code == 200, resp
    pid = resp["prompt_id"]
    # wait until Generate is running, then interrupt
    deadline = time.time() + 120
    while time.time() < deadline:
        _, q = server.get("/queue")
        if any(item[1] == pid for item in q.get("queue_running", [])):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    server.post("/interrupt", {})
    entry = server.wait(pid, timeout=300)
    events = [ev for ev, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events or entry["status"]["status_str"] == "error", events
    assert "execution_success" not in events, "the run finished before the cancel arrived"
    # the next run works
    nxt = copy.deepcopy(wf)
    nxt["2"]["inputs"]["seed"] = 55
    after = server.run(nxt)
    assert_success(server, after)
    assert outputs_of(after, "images")


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_error_reaches_history(server):
    # tokens of the bsq_dim 64 checkpoint fed to the bsq_dim 16 checkpoint's decoder: a TokenError at run time
    wf = {
        "1": {"class_type": "UniARModelLoader", "inputs": {"ckpt_name": "uniar-tiny", "dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "UniARModelLoader", "inputs": {"ckpt_name": "uniar-tiny-bsq64", "dtype": "auto", "attention": "auto"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGE_NAME}},
        "4": {"class_type": "UniAREncodeImage", "inputs": {"model": ["2", 0], "image": ["3", 0]}},
        "5": {"class_type": "UniARCaption", "inputs": {"model": ["1", 0], "tokens": ["4", 0], "question": "What is it?",
              "max_new_tokens": 4, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 0}},
    }
    entry = server.run(wf)
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and err, entry["status"]
    assert err["node_type"] == "UniARCaption" and "incompatible" in err["exception_message"], err
    assert err["exception_type"].endswith("TokenError"), err


def test_one_error_per_bad_input(server):
    """Out of range: rejected at validation with one error, naming the input.  In range but not a multiple of 32:
    one execution error that says what to use, raised before any weights load."""
    wf = load_api_workflow("text_to_image")
    wf["2"]["inputs"]["width"] = 5000
    code, resp = server.queue(wf)
    assert code == 400, resp
    errors = resp["node_errors"]["2"]["errors"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "width", errors
    assert len(resp["node_errors"]) == 1, resp["node_errors"]

    wf["2"]["inputs"]["width"] = 100
    entry = server.run(wf)
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and err["node_type"] == "UniARGenerate", entry["status"]
    assert "width=100 must be a positive multiple of 32 (e.g. 96)" in err["exception_message"], err
    errors = [m for ev, m in entry["status"]["messages"] if ev == "execution_error"]
    assert len(errors) == 1


def test_free_memory_releases_the_pack_models(server):
    """'Free model and node cache' (POST /free with free_memory) drops ComfyUI's cached node outputs, and with
    them the UNIAR_MODEL handles that own the pack's loaded parts: their host copies go too."""
    entry = server.run(with_ckpt(load_api_workflow("caption"), "uniar-tiny-bsq64"))
    assert_success(server, entry)
    before = server.log_text().count("UniAR: released the loaded parts of uniar-tiny-bsq64")
    code, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert code == 200
    deadline = time.time() + 30
    while time.time() < deadline:
        if server.log_text().count("UniAR: released the loaded parts of uniar-tiny-bsq64") > before:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the pack's models were not released after POST /free:\n" + server.log_tail())
    again = server.run(with_ckpt(load_api_workflow("caption"), "uniar-tiny-bsq64"))  # and load again on demand
    assert_success(server, again)


# ------------------------------------------------------------------------------------------------ dynamic VRAM
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_run_with_dynamic_vram_layers(dynamic_vram_server, name):
    """Under dynamic VRAM comfy.ops Linear layers are created without weights and take them in
    _load_from_state_dict; every node loads its parts and runs (this failed with 'Missing key(s)' before)."""
    srv = dynamic_vram_server
    assert "sim_dynamic_vram: WINDOWS=True" in srv.log_text(), "the dynamic-VRAM simulation did not load"
    entry = srv.run(with_ckpt(load_api_workflow(name), "uniar-tiny-bsq64"), timeout=600)
    assert_success(srv, entry)
    assert "into lazily created layers" in srv.log_text(), "the layers were not lazy: the simulation had no effect"


def test_load_tokens_roundtrip(server):
    """Save Tokens -> copy to input -> Load Tokens -> Decode + Preview."""
    entry = server.run(load_api_workflow("text_to_image"))
    assert_success(server, entry)
    (_, item), = outputs_of(entry, "uniar_tokens")
    dst = os.path.join(server.base, "input", "uniar", "saved.safetensors")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(server.output_path(item), "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    wf = {
        "1": {"class_type": "UniARModelLoader", "inputs": {"ckpt_name": "uniar-tiny", "dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "UniARLoadTokens", "inputs": {"tokens_file": "uniar/saved.safetensors"}},
        "3": {"class_type": "UniARPreviewTokens", "inputs": {"tokens": ["2", 0], "mode": "planes", "level": 0, "scale": 3}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "uniar/planes"}},
        "5": {"class_type": "UniARDecode", "inputs": {"model": ["1", 0], "tokens": ["2", 0], "steps": 1, "guidance": 1.0,
              "upsampling_ratio": 2.0, "seed": 3, "decoder_prompt": ""}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "uniar/x2"}},
    }
    entry = server.run(wf)
    assert_success(server, entry)
    sizes = {n: image_size(server, it) for n, it in outputs_of(entry, "images")}
    assert sizes["6"] == (128, 128), sizes


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_weights_match_the_cli(server, weights, tmp_path):
    """The loader's ``weights`` input quantises while loading: the same tokens as the CLI's ``--weights``; the
    image decodes through the quantised DiT."""
    wf = with_ckpt(load_api_workflow("text_to_image"), "uniar-tiny")
    for node in wf.values():
        if node["class_type"] == "UniARModelLoader":
            node["inputs"]["weights"] = weights
    entry = server.run(wf, timeout=600)
    assert_success(server, entry)
    assert outputs_of(entry, "images")
    (nid, item), = outputs_of(entry, "uniar_tokens")
    ours, _ = _load_tokens(server.output_path(item))
    gen = wf[wf[nid]["inputs"]["tokens"][0]]["inputs"]
    _run_cli("generate", "--model", os.path.join(server.base, "uniar_models", "uniar-tiny"), "--prompt",
             gen["prompt"], "--height", gen["height"], "--width", gen["width"], "--cfg", gen["cfg"],
             "--temperature", gen["temperature"], "--seed", gen["seed"], "--batch-size", gen["batch_size"],
             "--out", tmp_path / "cli.safetensors", "--device", "cpu", "--weights", weights)
    cli, _ = _load_tokens(tmp_path / "cli.safetensors")
    assert bool((ours == cli).all()), "ComfyUI tokens differ from the CLI's"


def test_converted_folder_runs_in_comfyui(server):
    """A folder written by `quantize` is listed by the loader and runs every workflow.  Caption runs first, so the
    first part loaded is the vision tower alone (it once failed there: the image head's markers were taken for
    stray ones), then Reconstruct (Encode Image first), then the rest."""
    dst = os.path.join(server.base, "uniar_models", "uniar-tiny-fp8")
    if not os.path.isdir(dst):
        _run_cli("quantize", "--model", os.path.join(server.base, "uniar_models", "uniar-tiny"), "--format", "fp8",
                 "--out", dst)
    for name in ("caption", "reconstruct", "shared_context", "edit_image", "text_to_image"):
        if name not in WORKFLOWS:
            continue
        entry = server.run(with_ckpt(load_api_workflow(name), "uniar-tiny-fp8"), timeout=600)
        assert_success(server, entry)


def test_quantised_weights_with_dynamic_vram_layers(dynamic_vram_server):
    """Quantised layers beside ComfyUI's lazily created ones (dynamic VRAM's layer classes): t2i and caption run."""
    for name in ("text_to_image", "caption"):
        wf = with_ckpt(load_api_workflow(name), "uniar-tiny")
        for node in wf.values():
            if node["class_type"] == "UniARModelLoader":
                node["inputs"]["weights"] = "int4"
        assert_success(dynamic_vram_server, dynamic_vram_server.run(wf, timeout=600))
