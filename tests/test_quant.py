"""Low-VRAM weight formats (uniar_backend.quant): the formats' maths and ComfyUI key layout, the converter,
loading a stored or load-time-quantised folder, the fast path, the memory report and the refusals."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import CKPTS, ROOT, TEST_IMAGE, ckpt_path
from uniar_backend.api import UniAR
from uniar_backend.errors import CheckpointError, InputError
from uniar_backend.quant import FORMATS
from uniar_backend.quant.convert import convert
from uniar_backend.quant.formats import REGISTRY, check_device, get
from uniar_backend.quant.layers import QuantLinear

GIB = 1 << 30


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------- formats
def test_formats_error_order_and_linear_matches_dequantised_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 256, generator=g) * 0.05
    x = torch.randn(5, 256, generator=g)
    err = {}
    for name, f in REGISTRY.items():
        t = f.quantize(w)
        wd = f.dequantize(t, torch.float32)
        err[name] = _rel(wd, w)
        assert torch.allclose(f.linear(x, t, None), x @ wd.t(), atol=1e-4, rtol=1e-4)
    assert err["int8"] < 0.01 and err["fp8"] < 0.04 and err["int4"] < 0.12
    assert err["int8"] < err["fp8"] < err["int4"]


def test_comfyui_key_layout():
    w = torch.randn(8, 128)
    i8 = get("int8").quantize(w)
    assert i8["weight"].dtype == torch.int8 and i8["weight_scale"].shape == (8, 1)
    assert i8["weight_scale"].dtype == torch.float32
    f8 = get("fp8").quantize(w)
    assert f8["weight"].dtype == torch.float8_e4m3fn and f8["weight_scale"].shape == ()
    i4 = get("int4").quantize(w)
    assert i4["weight"].shape == (8, 64) and i4["weight"].dtype == torch.int8
    assert i4["weight_scale"].shape == (2, 8) and i4["weight_zeros"].shape == (2, 8)
    # awq_w4a16 packing: column 2j in the low nibble, column 2j+1 in the high one, W = (q - 8) * s + z
    u = i4["weight"].view(torch.uint8).to(torch.int32)
    q = torch.empty(8, 128, dtype=torch.int32)
    q[:, 0::2], q[:, 1::2] = u & 15, u >> 4
    s = i4["weight_scale"].t().float().repeat_interleave(64, dim=1)
    z = i4["weight_zeros"].t().float().repeat_interleave(64, dim=1)
    assert torch.allclose((q - 8) * s + z, get("int4").dequantize(i4, torch.float32), atol=1e-6)


def test_quant_linear_keeps_stored_dtypes_and_takes_the_lean_path():
    from uniar_backend.sampling.image import linear_call

    m = QuantLinear(128, 16, True, "fp8", torch.float32)
    for k, v in get("fp8").quantize(torch.randn(16, 128)).items():
        setattr(m, k, torch.nn.Parameter(v, requires_grad=False))
    m.bias.data.zero_()
    m.to(torch.float16)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
    assert m.bias.dtype == torch.float16
    f = linear_call(m)
    assert not isinstance(f, torch.nn.Module)  # the layer's own call, not a module call
    x = torch.randn(2, 128, dtype=torch.float16)
    assert torch.equal(f(x), m(x))


def test_format_the_device_cannot_run_is_refused():
    with pytest.raises(InputError, match="MPS"):
        check_device(get("fp8"), torch.device("mps"))
    with pytest.raises(InputError, match="int8, fp8, int4"):
        get("nf4")


# ---------------------------------------------------------------------------------------------- converter + load
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant")
    out = {}
    for name in CKPTS:
        for fmt in FORMATS:
            dst = str(base / f"{name}-{fmt}")
            convert(ckpt_path(name), fmt, dst)
            out[name, fmt] = dst
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_folder_layout(converted, fmt):
    dst = converted["uniar-tiny", fmt]
    src = ckpt_path("uniar-tiny")
    assert not [d for d in os.listdir(os.path.dirname(dst)) if ".partial-" in d]
    for folder, _, names in os.walk(src):  # every file of the source is there
        for n in names:
            assert os.path.exists(os.path.join(dst, os.path.relpath(os.path.join(folder, n), src)))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["uniar_quantization"]["format"] == fmt
    assert json.load(open(os.path.join(dst, "sd3_transformer", "config.json")))["uniar_quantization"]["format"] == fmt
    with safe_open(os.path.join(dst, "model.safetensors"), "pt") as f:
        assert f.metadata()["uniar_quantization"] == fmt
        keys = set(f.keys())
        layer = "model.language_model.layers.0.mlp.up_proj"
        conf = json.loads(bytes(f.get_tensor(layer + ".comfy_quant").tolist()))
        assert conf["format"] == get(fmt).comfy_name
        assert f.get_tensor(layer + ".weight").dtype == get(fmt).storage
        assert "lm_head.weight" in keys and "lm_head.comfy_quant" not in keys  # lm_head stays float
        assert not any(k.startswith("model.visual.") and k.endswith("comfy_quant") for k in keys)
    # bsq_encoder and the VAE are copied byte for byte
    for rel in ("bsq_encoder/model.safetensors", "sd3_pipeline/vae/diffusion_pytorch_model.safetensors"):
        assert open(os.path.join(src, rel), "rb").read() == open(os.path.join(dst, rel), "rb").read()


@pytest.mark.parametrize("name", CKPTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_generate_caption_decode(converted, name, fmt):
    """A converted folder loads as stored and gives exactly what load-time quantisation of the float folder gives
    (the same tensors); generate / caption / decode run on it, and int8 stays closest to the float model."""
    from uniar_backend.decoder import load_decoder
    from uniar_backend.preprocess import load_image

    stored = UniAR.load(converted[name, fmt], device="cpu", dtype="float32")
    assert stored.model.weight_format == fmt
    live = UniAR.load(ckpt_path(name), device="cpu", dtype="float32", weights=fmt)
    a = stored.generate(["A red cube."], 64, 64, cfg=1.5, seed=3)
    b = live.generate(["A red cube."], 64, 64, cfg=1.5, seed=3)
    assert torch.equal(a.indices, b.indices)
    img = load_image(TEST_IMAGE)
    ans = stored.caption("What is this?", image=img, max_new_tokens=8)
    assert ans == live.caption("What is this?", image=img, max_new_tokens=8)
    dec = load_decoder(converted[name, fmt], device="cpu", dtype="float32")
    assert dec.transformer.weight_format == fmt
    im = dec.decode(a, steps=2, seed=0)
    im2 = load_decoder(ckpt_path(name), device="cpu", dtype="float32", weights=fmt).decode(a, steps=2, seed=0)
    assert im.shape == (1, 64, 64, 3) and torch.equal(im, im2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_folder_loads_part_by_part(converted, fmt, tmp_path):
    """Every part of a stored folder loads on its own, as a node that is the first to load it does (Caption,
    Encode Image: the vision tower without the image head whose visual_decoder is quantised), through the CLI's
    caption and tokenize too; a mixed folder is still refused where the load reads it."""
    from conftest import run_cli
    from uniar_backend.decoder.components import load_transformer
    from uniar_backend.loader import Checkpoint

    d = converted["uniar-tiny", fmt]
    ck = Checkpoint(d)
    for parts in (("vision",), ("llm", "vision", "lm_head"), ("llm", "lm_head"), ("llm", "gen_head")):
        m = ck.load_ar(parts, device="cpu", dtype="float32")
        assert m.weight_format == fmt and set(m.components) == set(parts)
    assert load_transformer(d, "cpu", torch.float32).weight_format == fmt
    run_cli("tokenize", "--model", d, "--image", TEST_IMAGE, "--device", "cpu", "--out", tmp_path / "t.safetensors")
    r = run_cli("caption", "--model", d, "--image", TEST_IMAGE, "--question", "What is this?", "--device", "cpu",
                "--max-new-tokens", "4")
    assert r.stdout.strip()
    r = run_cli("caption", "--model", d, "--tokens", tmp_path / "t.safetensors", "--question", "What?",
                "--device", "cpu", "--max-new-tokens", "4")
    assert r.stdout.strip()

    # a stray marker inside a part that is loaded is still refused (the vision tower keeps float weights)
    bad = _copy(converted, fmt, tmp_path)
    layer = "model.visual.blocks.0.mlp.linear_fc1"

    def mark(sd):
        from uniar_backend.quant.formats import comfy_quant_tensor
        assert layer + ".weight" in sd
        sd[layer + ".comfy_quant"] = comfy_quant_tensor(get(fmt))
    _edit(os.path.join(bad, "model.safetensors"), mark)
    with pytest.raises(CheckpointError, match="mixes formats"):
        Checkpoint(bad).load_ar(("vision",), device="cpu", dtype="float32")
    Checkpoint(bad).load_ar(("llm", "lm_head"), device="cpu", dtype="float32")  # a part that does not read it


@pytest.mark.parametrize("name", CKPTS)
def test_logit_error_order_against_float(name):
    """Logits of one prefill: int8 and fp8 stay close to the float model, int4 further (the error-table claim)."""
    from uniar_backend.tools.quant_report import llm_logits

    base = UniAR.load(ckpt_path(name), ("llm", "gen_head", "lm_head"), device="cpu", dtype="float32")
    ids = torch.arange(5, 45).view(1, -1)
    ref = llm_logits(base.model, ids)
    cos = {}
    for fmt in FORMATS:
        q = UniAR.load(ckpt_path(name), ("llm", "gen_head", "lm_head"), device="cpu", dtype="float32", weights=fmt)
        cos[fmt] = torch.nn.functional.cosine_similarity(llm_logits(q.model, ids).flatten(), ref.flatten(),
                                                         dim=0).item()
    assert cos["int8"] > 0.999 and cos["fp8"] > 0.99 and cos["int4"] > 0.9
    assert min(cos["int8"], cos["fp8"]) > cos["int4"]


# ---------------------------------------------------------------------------------------------- refusals
def test_converter_refusals(converted, tmp_path):
    src = ckpt_path("uniar-tiny")
    with pytest.raises(InputError, match="inside"):
        convert(src, "int8", os.path.join(src, "q8"))
    with pytest.raises(InputError, match="already exists"):
        convert(src, "int8", converted["uniar-tiny", "int4"])
    with pytest.raises(InputError, match="already stored in int4"):
        convert(converted["uniar-tiny", "int4"], "int8", str(tmp_path / "x"))
    # Ctrl-C in the middle: nothing is left behind
    def interrupt(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        convert(src, "int8", str(tmp_path / "y"), progress=interrupt)
    assert os.listdir(tmp_path) == []


def _copy(converted, fmt, tmp_path):
    dst = str(tmp_path / f"bad-{fmt}-{len(os.listdir(tmp_path))}")
    shutil.copytree(converted["uniar-tiny", fmt], dst)
    return dst


def _edit(path, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_scale_wrong_packing_mixed_and_unknown_format_are_refused(converted, tmp_path):
    layer = "model.language_model.layers.1.self_attn.q_proj"
    d = _copy(converted, "int8", tmp_path)
    _edit(os.path.join(d, "model.safetensors"), lambda sd: sd.pop(layer + ".weight_scale"))
    with pytest.raises(CheckpointError, match="missing.*weight_scale"):
        UniAR.load(d, device="cpu", dtype="float32")

    d = _copy(converted, "int4", tmp_path)
    _edit(os.path.join(d, "model.safetensors"), lambda sd: sd.__setitem__(layer + ".weight",
                                                                          sd[layer + ".weight"][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match="shape"):
        UniAR.load(d, device="cpu", dtype="float32")

    d = _copy(converted, "int8", tmp_path)  # one layer of an int8 folder stored in fp8
    fp8 = get("fp8").quantize(torch.randn(64, 64))

    def mix(sd):
        from uniar_backend.quant.formats import comfy_quant_tensor
        sd[layer + ".weight"], sd[layer + ".weight_scale"] = fp8["weight"], fp8["weight_scale"]
        sd[layer + ".comfy_quant"] = comfy_quant_tensor(get("fp8"))
    _edit(os.path.join(d, "model.safetensors"), mix)
    with pytest.raises(CheckpointError, match="mixes formats"):
        UniAR.load(d, device="cpu", dtype="float32")

    d = _copy(converted, "int8", tmp_path)  # quantised weights, float config
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("uniar_quantization")
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="records no uniar_quantization"):
        UniAR.load(d, device="cpu", dtype="float32")
    cfg["uniar_quantization"] = {"format": "nf4"}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="does not know"):
        UniAR.load(d, device="cpu", dtype="float32")

    with pytest.raises(CheckpointError, match="cannot be loaded as int4"):
        UniAR.load(converted["uniar-tiny", "int8"], device="cpu", dtype="float32", weights="int4")


def test_damaged_markers_and_non_finite_scales_are_refused(converted, tmp_path):
    """A comfy_quant marker nested 100,000 deep, of the wrong shape or oversized: one CheckpointError before the
    weights are read; NaN / inf in a scale (or zero point): refused at load, nothing half-loaded."""
    from uniar_backend.loader import Checkpoint

    layer = "model.language_model.layers.1.self_attn.q_proj"
    for marker, what in ((torch.tensor(list(b"[" * 100_000), dtype=torch.uint8), "at most 4096 bytes"),
                         (torch.tensor(list(b"[" * 4000), dtype=torch.uint8), "nested too deeply"),
                         (torch.zeros(2, 8, dtype=torch.uint8), "1-D uint8"),
                         (torch.zeros(8, dtype=torch.float32), "1-D uint8"),
                         (torch.tensor(list(b"[[[]]]"), dtype=torch.uint8), "expected a JSON object")):
        d = _copy(converted, "int8", tmp_path)
        _edit(os.path.join(d, "model.safetensors"), lambda sd: sd.__setitem__(layer + ".comfy_quant", marker))
        with pytest.raises(CheckpointError, match=what):
            Checkpoint(d).load_ar(("llm", "lm_head"), device="cpu", dtype="float32")

    for fmt in FORMATS:
        scales = [n for n in get(fmt).layout(64, 64) if n != "weight"]
        for name in scales:
            for value in (float("nan"), float("inf")):
                d = _copy(converted, fmt, tmp_path)

                def spoil(sd):
                    t = sd[f"{layer}.{name}"]
                    if t.is_floating_point():
                        t.view(-1)[0] = value
                _edit(os.path.join(d, "model.safetensors"), spoil)
                with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
                    if not f.get_tensor(f"{layer}.{name}").is_floating_point():
                        continue  # integer zero points are finite by construction
                with pytest.raises(CheckpointError, match=f"'{layer}.{name}' holds 1 NaN or infinite"):
                    UniAR.load(d, device="cpu", dtype="float32")
                shutil.rmtree(d)


def test_cli_quantize_and_weights_option(tmp_path):
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "uniar_backend", "quantize", "--model", ckpt_path("uniar-tiny"),
                        "--format", "int4", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "int4" in r.stdout and out.is_dir()
    r = subprocess.run([sys.executable, "-m", "uniar_backend", "generate", "--model", ckpt_path("uniar-tiny"),
                        "--weights", "int8", "--device", "cpu", "--prompt", "a", "--height", "64", "--width", "64",
                        "--out", str(tmp_path / "t.safetensors")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------- memory
@pytest.fixture(scope="module")
def reports():
    from uniar_backend.memory import report

    return {f: report(f) for f in ("bf16",) + FORMATS}


def test_memory_report_real_sizes_and_targets(reports):
    bf = reports["bf16"]["components"]
    # the real AR model: 9.6 B parameters, 19.3 GB in bf16 (all four AR parts)
    ar = bf["llm"] + bf["lm_head"] + bf["vision"] + bf["gen_head"]
    assert 19.0e9 < ar < 19.6e9
    for f in ("int8", "int4"):
        c = reports[f]["components"]
        assert set(c) == {"llm", "lm_head", "vision", "gen_head", "dit", "vae", "bsq_projections"}
        assert c["lm_head"] == bf["lm_head"] and c["vision"] == bf["vision"] and c["vae"] == bf["vae"]
    i8, i4 = reports["int8"], reports["int4"]
    assert i8["components"]["llm"] + i8["components"]["gen_head"] <= 9.0 * GIB
    assert i4["components"]["llm"] + i4["components"]["gen_head"] <= 5.5 * GIB
    assert i8["components"]["dit"] <= 2.5 * GIB and reports["fp8"]["components"]["dit"] <= 2.5 * GIB
    assert i8["peak_bytes"]["t2i_1024"] <= 11 * GIB
    assert i4["peak_bytes"]["t2i_1024"] <= 7.25 * GIB


def test_memory_cli_json():
    r = subprocess.run([sys.executable, "-m", "uniar_backend", "memory", "--format", "int8", "--json"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["format"] == "int8" and set(d["peak_bytes"]) == {"t2i_1024", "caption"}


# ---------------------------------------------------------------------------------------------- bounded memory
CONVERT_RSS = r"""
import json, resource, sys
from uniar_backend.quant.convert import convert
import uniar_backend.loader, uniar_backend.decoder.sd3  # imports first: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert(sys.argv[1], "int8", sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "peak_kib": peak}))
"""


def test_converter_memory_is_bounded(tmp_path):
    """A 0.8 GB checkpoint in 4 shards converts with a few tensors in memory, not the checkpoint or a shard."""
    from uniar_backend.tools import synthetic

    src = str(tmp_path / "big")
    cfg = synthetic.config_dict(hidden=2048, layers=8, stack_depth=1, heads=16, kv_heads=4, head_dim=128,
                                intermediate=5632)
    code = ("import sys, torch; from uniar_backend.tools import synthetic; import json;"
            "synthetic.write_checkpoint(sys.argv[1], json.loads(sys.argv[2]), shards=4, dtype=torch.bfloat16,"
            f"source={ckpt_path('uniar-tiny')!r})")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", code, src, json.dumps(cfg)], check=True, env=env, timeout=600)
    shutil.copytree(os.path.join(ckpt_path("uniar-tiny"), "sd3_transformer"), os.path.join(src, "sd3_transformer"))
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.startswith("model-"))
    assert size > 0.8e9
    r = subprocess.run([sys.executable, "-c", CONVERT_RSS, src, str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grown = (m["peak_kib"] - m["base_kib"]) * 1024
    assert grown < size / 8, f"converter grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
    out_size = sum(os.path.getsize(os.path.join(tmp_path / "out", f)) for f in os.listdir(tmp_path / "out")
                   if f.startswith("model-"))
    assert out_size < 0.6 * size


# ---------------------------------------------------------------------------------------------- DiT positions
def test_dit_position_table_compacted_bitwise():
    """The loader keeps SD3's separable sin-cos table as two 1-D factors; the DiT's output is bitwise the same as
    with diffusers' cropped whole table, and a table that is not separable stays whole."""
    from uniar_backend.decoder import components as C

    root = ckpt_path("uniar-tiny")
    dit = C.load_transformer(root, "cpu", torch.float32)
    assert dit.pos_embed.pos_embed is None and dit.pos_factor_a.shape == (32, dit.inner_dim // 2)
    from uniar_backend.checkpoint import WeightFiles

    files = WeightFiles(os.path.join(root, "sd3_transformer"), "diffusion_pytorch_model")
    table = files.read(["pos_embed.pos_embed"])["pos_embed.pos_embed"].float()

    def with_table(t):
        m = C.load_transformer(root, "cpu", torch.float32)
        del m.pos_factor_a, m.pos_factor_b, m.pos_embed.pos_embed
        m.pos_embed.register_buffer("pos_embed", t)
        return m

    whole = with_table(table)
    g = torch.Generator().manual_seed(0)
    for hw in ((8, 8), (6, 10)):
        lat = torch.randn(1, 16, *hw, generator=g)
        args = (torch.randn(1, 7, dit.config.joint_attention_dim, generator=g),
                torch.randn(1, dit.config.pooled_projection_dim, generator=g), torch.tensor([500.0]))
        assert torch.equal(dit(lat, *args)[0], whole(lat, *args)[0])
    noisy = with_table(table + torch.randn(table.shape, generator=g) * 1e-3)
    assert noisy.compact_positions() is False and noisy.pos_embed.pos_embed is not None


# ---------------------------------------------------------------------------------------------- converter paths
def _linked_checkpoint(tmp_path):
    """uniar-tiny with its decoder folders shared by links (as users share sd3_pipeline/ between SFT and RL), and a
    link loop inside one of them."""
    src = ckpt_path("uniar-tiny")
    d = tmp_path / "linked"
    d.mkdir()
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if os.path.isdir(p):
            shared = tmp_path / "shared" / name
            shutil.copytree(p, shared)
            os.symlink(shared, d / name, target_is_directory=True)
        else:
            shutil.copy(p, d / name)
    os.symlink(d, tmp_path / "shared" / "sd3_pipeline" / "loop", target_is_directory=True)
    return src, d


def test_converter_follows_linked_folders_and_checks_the_result(tmp_path):
    src, d = _linked_checkpoint(tmp_path)
    out = tmp_path / "q8"
    convert(str(d), "int8", str(out))
    for folder, _, names in os.walk(src):  # every file of the checkpoint is there
        for n in names:
            assert (out / os.path.relpath(os.path.join(folder, n), src)).is_file(), n
    assert json.load(open(out / "sd3_transformer" / "config.json"))["uniar_quantization"]["format"] == "int8"
    assert not (out / "sd3_pipeline" / "loop").exists()  # the loop back to the checkpoint is not copied
    from uniar_backend.decoder import load_decoder
    assert load_decoder(str(out), device="cpu", dtype="float32").transformer.weight_format == "int8"


def test_converter_out_link_is_refused_before_work(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "nowhere"):
        link = tmp_path / f"out-{target.name}"
        os.symlink(target, link)
        with pytest.raises(InputError, match="symbolic link"):
            convert(ckpt_path("uniar-tiny"), "int8", str(link))
    assert sorted(os.listdir(tmp_path)) == ["empty", "out-empty", "out-nowhere"]


def _pack_checkpoints():
    """nodes/checkpoints.py of the pack, imported inside the pack loaded by path (as tests/test_nodes.py does)."""
    import importlib
    import importlib.util

    if "uniar_pack_pure" not in sys.modules:
        spec = importlib.util.spec_from_file_location("uniar_pack_pure", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["uniar_pack_pure"] = pack
        spec.loader.exec_module(pack)
    return importlib.import_module("uniar_pack_pure.nodes.checkpoints")


SLOW_CONVERT = """
import sys, time
import uniar_backend.cli as cli
import uniar_backend.quant.convert as c
orig = c.write_safetensors_streaming
def slow(*a, **k):
    r = orig(*a, **k)
    print("WROTE", flush=True)
    time.sleep(120)
    return r
c.write_safetensors_streaming = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_interrupted_conversion_leaves_nothing_listed_and_reruns_clean(tmp_path, sig):
    """SIGTERM: the partial folder is removed at once (exit 143).  SIGKILL: it stays, the loader does not list
    it, and the next run for the same --out removes it and completes."""
    import signal

    list_checkpoints = _pack_checkpoints().list_checkpoints
    models = tmp_path / "uniar"
    models.mkdir()
    out = models / "q8"
    args = ["quantize", "--model", ckpt_path("uniar-tiny"), "--format", "int8", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == "WROTE"
    partial = [n for n in os.listdir(models) if ".partial-" in n]
    assert len(partial) == 1
    shutil.copy(os.path.join(ckpt_path("uniar-tiny"), "config.json"), models / partial[0] / "config.json")
    assert list_checkpoints([str(models)]) == []  # a conversion in progress is not offered
    p.send_signal(getattr(signal, sig))
    rc = p.wait(timeout=60)
    if sig == "SIGTERM":
        assert rc == 143 and "terminated" in p.stderr.read()
        assert os.listdir(models) == []
    else:
        assert os.listdir(models) == partial
    run = subprocess.run([sys.executable, "-m", "uniar_backend", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert os.listdir(models) == ["q8"] and list_checkpoints([str(models)]) == ["q8"]
