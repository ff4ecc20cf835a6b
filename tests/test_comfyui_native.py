"""The native decode route in a real ComfyUI (CPU, loopback only), on the fixture checkpoints.

UniAR Decoder Loader (MODEL + VAE) + UniAR Tokens to Conditioning + UniAR Empty Latent through ComfyUI's own
SamplerCustomAdvanced / KSampler / VAE Decode, against UniAR Decode in the same prompt.  Runs only when
``COMFYUI_PATH`` is set (see tests/test_comfyui_live.py); run it once per ComfyUI release (0.3.64, 0.28.0)::

    COMFYUI_PATH=~/comfy28 COMFYUI_PYTHON=~/comfy28/venv/bin/python python -m pytest -q tests/test_comfyui_native.py

Set ``UNIAR_PARITY_REPORT=<file>`` to append the measured level differences and PSNRs (the README's numbers).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_server import (FIXTURE_CKPTS, SIM_DYNAMIC_VRAM, execution_error, live_server,  # noqa: E402
                            skip_without_dynamic_vram)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
HELPER_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_nodes", "uniar_test_sd3_conditioning.py")
REPORT = os.environ.get("UNIAR_PARITY_REPORT")

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH,
    reason="live ComfyUI tests need COMFYUI_PATH=<ComfyUI source tree> (and COMFYUI_PYTHON=<its interpreter>)",
)


def _server(extra_nodes=()):
    yield from live_server(COMFYUI_PATH, COMFYUI_PYTHON, [HELPER_NODES, *extra_nodes],
                           ["--preview-method", "latent2rgb"])


@pytest.fixture(scope="module")
def server():
    yield from _server()


@pytest.fixture(scope="module")
def dynamic_vram_server():
    skip_without_dynamic_vram(COMFYUI_PATH)
    yield from _server([SIM_DYNAMIC_VRAM])


def report(line: str) -> None:
    print(line)
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------------------------ graphs
def loader(ckpt: str, weights: str = "as stored") -> dict:
    return {"class_type": "UniARModelLoader",
            "inputs": {"ckpt_name": ckpt, "dtype": "auto", "attention": "auto", "weights": weights}}


def generate(w: int, h: int, seed: int = 7, batch: int = 1) -> dict:
    return {"class_type": "UniARGenerate",
            "inputs": {"model": ["1", 0], "prompt": "A red cube on a blue table.", "aspect_ratio": "custom (width x height)",
                       "width": w, "height": h, "cfg": 1.5, "temperature": 1.0, "seed": seed, "batch_size": batch,
                       "mode": "fast"}}


def native_graph(ckpt: str, w: int, h: int, cases, steps: int, seed: int = 42, weights: str = "as stored",
                 ksampler: bool = False) -> dict:
    """Tokens once; per (ratio, guidance) case UniAR Decode (``d<i>``) and SamplerCustomAdvanced with the reference
    noise and sigmas + VAE Decode (``n<i>``); with ``ksampler`` also KSampler euler/simple + VAE Decode (``k<i>``)."""
    g = {"1": loader(ckpt, weights), "2": generate(w, h),
         "3": {"class_type": "UniARDecoderLoader", "inputs": {"model": ["1", 0]}},
         "4": {"class_type": "UniARTokensToConditioning", "inputs": {"model": ["1", 0], "tokens": ["2", 0]}},
         "5": {"class_type": "UniARReferenceNoise", "inputs": {"model": ["3", 0], "seed": seed}},
         "6": {"class_type": "UniARReferenceSigmas", "inputs": {"model": ["3", 0], "steps": steps}},
         "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}}
    for i, (ratio, guidance) in enumerate(cases):
        g[f"d{i}"] = {"class_type": "UniARDecode", "inputs": {
            "model": ["1", 0], "tokens": ["2", 0], "steps": steps, "guidance": guidance, "upsampling_ratio": ratio,
            "seed": seed, "decoder_prompt": ""}}
        g[f"sd{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"d{i}", 0], "filename_prefix": f"uniar/d{i}"}}
        g[f"l{i}"] = {"class_type": "UniAREmptyLatent", "inputs": {"tokens": ["2", 0], "upsampling_ratio": ratio}}
        g[f"g{i}"] = {"class_type": "CFGGuider", "inputs": {"model": ["3", 0], "positive": ["4", 0],
                                                            "negative": ["4", 1], "cfg": guidance}}
        g[f"s{i}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["5", 0], "guider": [f"g{i}", 0], "sampler": ["7", 0], "sigmas": ["6", 0],
            "latent_image": [f"l{i}", 0]}}
        g[f"v{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"s{i}", 0], "vae": ["3", 1]}}
        g[f"sn{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"v{i}", 0], "filename_prefix": f"uniar/n{i}"}}
        if ksampler:
            g[f"k{i}"] = {"class_type": "KSampler", "inputs": {
                "model": ["3", 0], "seed": seed, "steps": steps, "cfg": guidance, "sampler_name": "euler",
                "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1], "latent_image": [f"l{i}", 0],
                "denoise": 1.0}}
            g[f"kv{i}"] = {"class_type": "VAEDecodeTiled", "inputs": {
                "samples": [f"k{i}", 0], "vae": ["3", 1], "tile_size": 512, "overlap": 64, "temporal_size": 64,
                "temporal_overlap": 8}}
            g[f"sk{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"kv{i}", 0],
                                                                 "filename_prefix": f"uniar/k{i}"}}
    return g


def images(server, entry) -> dict:
    import numpy as np
    from PIL import Image

    out = {}
    for nid, o in entry.get("outputs", {}).items():
        out[nid] = [np.asarray(Image.open(io.BytesIO(server.view(it))).convert("RGB")).astype(np.int16)
                    for it in o.get("images", [])]
    return out


def sd3_text(width: int, pooled: int) -> dict:
    """A plain SD3-shaped CONDITIONING (the test helper node), as CLIPTextEncodeSD3 makes one."""
    return {"class_type": "UniARTestSD3Conditioning",
            "inputs": {"length": 20, "width": width, "pooled": pooled, "value": 0.3}}


def run_ok(server, graph, timeout=600) -> dict:
    entry = server.run(graph, timeout=timeout)
    assert entry.get("status", {}).get("status_str") == "success", f"{execution_error(entry)}\n{server.log_tail()}"
    return entry


def psnr(a, b) -> float:
    mse = float(((a.astype("float64") - b.astype("float64")) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------ parity
CASES = [(1.0, 1.0), (1.0, 1.5), (1.5, 1.0), (1.5, 1.5)]


@pytest.mark.parametrize("shape", [(64, 64), (96, 64)], ids=["square", "non-square"])
@pytest.mark.parametrize("ckpt", FIXTURE_CKPTS)
def test_sampler_custom_advanced_reproduces_uniar_decode(server, ckpt, shape):
    """Reference noise + sigmas + CFGGuider + euler + VAE Decode: within 1 level of UniAR Decode for every ratio
    and guidance (square and non-square tokens, both fixtures)."""
    w, h = shape
    imgs = images(server, run_ok(server, native_graph(ckpt, w, h, CASES, steps=4)))
    for i, (ratio, guidance) in enumerate(CASES):
        (a,), (b,) = imgs[f"sd{i}"], imgs[f"sn{i}"]
        assert a.shape == b.shape == (round(h * ratio), round(w * ratio), 3), (a.shape, b.shape)
        diff = int(abs(a - b).max())
        report(f"parity {ckpt} {w}x{h} ratio {ratio} guidance {guidance}: max level difference {diff}")
        assert diff <= 1, (ckpt, shape, ratio, guidance, diff)


def test_ksampler_gives_a_valid_decode_of_the_same_tokens(server):
    """KSampler (its own noise: the same float32 draw for the same seed; the 'simple' schedule instead of the
    checkpoint's) + VAE Decode (Tiled): a decode of the same tokens, close to UniAR Decode at 28 steps."""
    cases = [(1.0, 1.5), (1.5, 1.0)]
    for ckpt in FIXTURE_CKPTS:
        imgs = images(server, run_ok(server, native_graph(ckpt, 64, 96, cases, steps=28, ksampler=True)))
        for i, (ratio, guidance) in enumerate(cases):
            (a,), (n,), (k,) = imgs[f"sd{i}"], imgs[f"sn{i}"], imgs[f"sk{i}"]
            assert a.shape == n.shape == k.shape
            assert int(abs(a - n).max()) <= 1
            p = psnr(a, k)
            report(f"KSampler euler/simple vs UniAR Decode, {ckpt} 64x96 ratio {ratio} guidance {guidance}, 28 "
                   f"steps, seed 42: PSNR {p:.1f} dB, max level difference {int(abs(a - k).max())}")
            assert p > 30, p


def test_quantised_dit_on_the_native_route(server):
    """weights int8 on the loader: the Decoder Loader's DiT is quantised the same way; still within 1 level of
    UniAR Decode with the same handle."""
    imgs = images(server, run_ok(server, native_graph("uniar-tiny", 64, 64, [(1.0, 1.5)], steps=4, weights="int8")))
    assert int(abs(imgs["sd0"][0] - imgs["sn0"][0]).max()) <= 1
    assert "UniARDiTModel" in server.log_text()


def test_batch_of_tokens(server):
    g = native_graph("uniar-tiny-bsq64", 64, 64, [(1.0, 1.5)], steps=3)
    g["2"] = generate(64, 64, batch=2)
    imgs = images(server, run_ok(server, g))
    assert len(imgs["sd0"]) == len(imgs["sn0"]) == 2
    for a, b in zip(imgs["sd0"], imgs["sn0"]):
        assert int(abs(a - b).max()) <= 1


def test_sd3_text_conditioning_can_be_wired_in(server):
    """Any SD3 conditioning of the DiT's widths replaces the cached decoder prompt (both halves)."""
    g = native_graph("uniar-tiny", 64, 64, [(1.0, 1.5)], steps=3)
    g["c"] = sd3_text(48, 40)
    g["4"]["inputs"]["conditioning"] = ["c", 0]
    imgs = images(server, run_ok(server, g))
    assert imgs["sn0"][0].shape == (64, 64, 3)
    assert int(abs(imgs["sd0"][0] - imgs["sn0"][0]).max()) > 1  # another prompt: another picture


def test_vae_encode_and_img2img(server):
    """The VAE encodes too (VAE Encode and VAE Encode (Tiled)): UniAR Decode's picture -> VAE Encode -> KSampler at
    denoise 0.5 with the same tokens' conditioning -> VAE Decode."""
    g = native_graph("uniar-tiny-bsq64", 64, 96, [(1.5, 1.5)], steps=3)
    g["e"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["d0", 0], "vae": ["3", 1]}}
    g["et"] = {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["d0", 0], "vae": ["3", 1], "tile_size": 512,
                                                          "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}}
    for name, src in (("k", "e"), ("kt", "et")):
        g[name] = {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 5, "steps": 4, "cfg": 1.5, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["4", 1], "latent_image": [src, 0], "denoise": 0.5}}
        g[name + "v"] = {"class_type": "VAEDecode", "inputs": {"samples": [name, 0], "vae": ["3", 1]}}
        g[name + "s"] = {"class_type": "SaveImage", "inputs": {"images": [name + "v", 0],
                                                               "filename_prefix": f"uniar/{name}"}}
    imgs = images(server, run_ok(server, g))
    a, k, kt = imgs["sd0"][0], imgs["ks"][0], imgs["kts"][0]
    assert a.shape == k.shape == kt.shape == (144, 96, 3)
    assert int(abs(k - kt).max()) <= 1  # one tile: the tiled encode is the plain one


# ------------------------------------------------------------------------------------------------ ComfyUI's own
def run_with_socket(server, graph, interrupt_at: int | None = None, timeout: float = 300):
    """Queue over a websocket client: -> (history entry, preview images received, progress values)."""
    import aiohttp

    cid = str(uuid.uuid4())

    async def go():
        previews, progress, pid = 0, [], None
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(server.url.replace("http://", "ws://") + f"/ws?clientId={cid}") as ws:
                async with s.post(server.url + "/prompt", json={"prompt": graph, "client_id": cid}) as r:
                    pid = (await r.json())["prompt_id"]
                while True:
                    msg = await asyncio.wait_for(ws.receive(), timeout)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        previews += 1
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        d = json.loads(msg.data)
                        data = d.get("data", {})
                        if d["type"] == "progress":
                            progress.append(data["value"])
                            if interrupt_at is not None and data["value"] == interrupt_at:
                                await (await s.post(server.url + "/interrupt", json={})).release()
                        if data.get("prompt_id") == pid and (
                                d["type"] in ("execution_error", "execution_interrupted", "execution_success")
                                or (d["type"] == "executing" and data.get("node") is None)):
                            break
                    else:
                        break
        return pid, previews, progress

    pid, previews, progress = asyncio.run(go())
    return server.wait(pid, timeout), previews, progress


def ksampler_graph(steps: int, seed: int = 1) -> dict:
    g = native_graph("uniar-tiny-bsq64", 64, 64, [], steps=steps)
    g["l"] = {"class_type": "UniAREmptyLatent", "inputs": {"tokens": ["2", 0], "upsampling_ratio": 1.0}}
    g["k"] = {"class_type": "KSampler", "inputs": {
        "model": ["3", 0], "seed": seed, "steps": steps, "cfg": 1.5, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["l", 0], "denoise": 1.0}}
    g["v"] = {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["3", 1]}}
    g["s"] = {"class_type": "SaveImage", "inputs": {"images": ["v", 0], "filename_prefix": "uniar/k"}}
    return g


def test_progress_and_previews_come_from_comfyui(server):
    entry, previews, progress = run_with_socket(server, ksampler_graph(6))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert progress[-6:] == [1, 2, 3, 4, 5, 6], progress
    assert previews >= 1, "no latent preview was sent (--preview-method latent2rgb)"


def test_cancel_during_sampling(server):
    entry, _, progress = run_with_socket(server, ksampler_graph(2000, seed=2), interrupt_at=5)
    assert entry["status"]["status_str"] == "error", entry["status"]
    events = [ev for ev, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    assert max(progress) < 2000
    run_ok(server, ksampler_graph(3, seed=3))  # and the next run works


# ------------------------------------------------------------------------------------------------ bad input
def one_error(server, graph) -> dict:
    entry = server.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [m for ev, m in entry["status"]["messages"] if ev == "execution_error"]
    assert len(errors) == 1, errors
    return errors[0]


def test_tokens_from_another_checkpoint(server):
    g = native_graph("uniar-tiny", 64, 64, [(1.0, 1.5)], steps=2)
    g["m2"] = loader("uniar-tiny-bsq64")
    g["4"]["inputs"]["model"] = ["m2", 0]  # the conditioning node of another checkpoint (bsq_dim 64 vs 16)
    err = one_error(server, g)
    assert err["node_type"] == "UniARTokensToConditioning", err
    assert "incompatible" in err["exception_message"] and "Re-create the tokens" in err["exception_message"], err


def test_conditioning_and_model_of_different_checkpoints(server):
    """Tokens and conditioning of one checkpoint, the DiT of another (same feature width, another token encoder)."""
    g = native_graph("uniar-tiny-bsq64", 64, 64, [(1.0, 1.5)], steps=2)
    g["m2"] = loader("uniar-tiny")
    g["3"]["inputs"]["model"] = ["m2", 0]
    err = one_error(server, g)
    assert err["node_type"] == "SamplerCustomAdvanced", err
    msg = err["exception_message"]
    assert "another UniAR checkpoint's token encoder" in msg and "the same UniAR model" in msg, err


def test_conditioning_without_uniar_features(server):
    g = native_graph("uniar-tiny", 64, 64, [(1.0, 1.5)], steps=2)
    g["c"] = sd3_text(48, 40)
    g["g0"]["inputs"]["positive"] = ["c", 0]
    err = one_error(server, g)
    assert err["node_type"] == "SamplerCustomAdvanced", err
    assert "no UniAR token features" in err["exception_message"], err
    assert "UniAR Tokens to Conditioning" in err["exception_message"], err


def test_text_conditioning_of_the_wrong_width(server):
    g = native_graph("uniar-tiny", 64, 64, [(1.0, 1.5)], steps=2)
    g["c"] = sd3_text(4096, 2048)
    g["4"]["inputs"]["conditioning"] = ["c", 0]
    err = one_error(server, g)
    assert "(4096, 2048)" in err["exception_message"] and "(48, 40)" in err["exception_message"], err


@pytest.mark.parametrize("latent", [{"width": 96, "height": 64}, {"width": 160, "height": 160}],
                         ids=["not-a-ratio", "ratio-2.5"])
def test_latent_of_the_wrong_size(server, latent):
    g = native_graph("uniar-tiny", 64, 64, [(1.0, 1.5)], steps=2)
    g["l0"] = {"class_type": "EmptySD3LatentImage", "inputs": {**latent, "batch_size": 1}}
    err = one_error(server, g)
    assert err["node_type"] == "SamplerCustomAdvanced", err
    msg = err["exception_message"]
    assert "does not fit the tokens" in msg and "UniAR Empty Latent" in msg, err


# ------------------------------------------------------------------------------------------------ dynamic VRAM
def test_native_route_with_dynamic_vram_layers(dynamic_vram_server):
    srv = dynamic_vram_server
    g = native_graph("uniar-tiny-bsq64", 96, 64, [(1.5, 1.5)], steps=4)
    g["e"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["d0", 0], "vae": ["3", 1]}}
    g["ev"] = {"class_type": "VAEDecode", "inputs": {"samples": ["e", 0], "vae": ["3", 1]}}
    g["es"] = {"class_type": "SaveImage", "inputs": {"images": ["ev", 0], "filename_prefix": "uniar/roundtrip"}}
    imgs = images(srv, run_ok(srv, g))
    assert int(abs(imgs["sd0"][0] - imgs["sn0"][0]).max()) <= 1
    assert imgs["es"][0].shape == imgs["sd0"][0].shape
    assert "into lazily created layers" in srv.log_text(), "the layers were not lazy: the simulation had no effect"
