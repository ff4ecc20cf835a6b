"""Device correctness (the CUDA phase of the one-command GPU check): the fixtures on the device named by
``UNIAR_TEST_DEVICE`` (default ``cuda``) against the CPU goldens and against the CPU's own computation.

Every test is marked ``cuda`` and is skipped when that device is not available; a value that names no device is an
error.  ``UNIAR_TEST_DEVICE=cpu`` runs the same code on the CPU (the dry run; only the CUDA-only tests skip)::

    UNIAR_TEST_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py -rs

Float32 on the device is not bitwise the CPU (other kernels, other summation orders), so the golden checks compare
logits / scores within a stated bound and tokens exactly where the goldens' sampling margin exceeds what that bound
can move (checked on the goldens themselves, so the exact comparison is never a coin toss).  TF32 is off for
float32 matmuls and convolutions during every test here (restored afterwards)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import CKPTS, GEN_CASES, GOLDEN, ckpt_path, golden, load_model

from uniar_backend import api
from uniar_backend.bsq import bits_to_indices
from uniar_backend.loader import Checkpoint
from uniar_backend.tokens import VisualTokens

pytestmark = pytest.mark.cuda

DEVICE_ENV = "UNIAR_TEST_DEVICE"
SMALL_CASES = ("b1_t2i_64x64_cfg1.5", "c1_edit_64x64_cfg1.5")  # the smallest t2i and edit goldens (4 tokens each)

# Bounds (each stated where it is used).
LOGITS_EPS = 1e-4  # float32 device vs CPU golden: image logits at every step, caption scores (absolute)
Z_EPS = 1e-5  # float32 device vs CPU: the vision tower's normalised BSQ inputs z (absolute)
FEATURE_EPS = 1e-4  # float32 device vs CPU golden: bits -> LLM features (absolute)
BF16_REL = 0.05  # bfloat16 vs float32 logits on the device, as a fraction of the float32 logits' max |.|
FLASH_REL = 0.03  # flash-attention vs sdpa (both bfloat16), as a fraction of the sdpa output's max |.|
QUANT_REL = {torch.float32: 1e-5, torch.bfloat16: 0.02}  # QuantLinear on the device vs CPU dequantisation


# ---------------------------------------------------------------------------------------------- the device
def _device_from_env() -> torch.device:
    value = os.environ.get(DEVICE_ENV, "cuda").strip()
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        pytest.fail(f"{DEVICE_ENV}={value!r} is not a device these tests run on: use cuda (the default), cuda:N, "
                    "cpu (the dry run) or mps", pytrace=False)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"{DEVICE_ENV}={value}: CUDA is not available (torch {torch.__version__}); "
                        f"set {DEVICE_ENV}=cpu for the dry run")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            pytest.skip(f"{DEVICE_ENV}={value}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        pytest.skip(f"{DEVICE_ENV}={value}: MPS is not available")
    return dev


@pytest.fixture(scope="module", autouse=True)
def device():
    return _device_from_env()


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 means float32 here: no TF32 in matmuls (cuBLAS) or convolutions (cuDNN); restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cuda_only(device, what: str):
    if device.type != "cuda":
        pytest.skip(f"{what} exists only on CUDA ({DEVICE_ENV}={device})")


_DEVICE_MODELS = {}


def device_model(name, device, dtype="float32", attention="sdpa"):
    """The AR model loaded straight onto the device (conftest.load_model's cache, per device)."""
    key = (name, str(device), dtype, attention)
    if key not in _DEVICE_MODELS:
        ck = Checkpoint(ckpt_path(name))
        _DEVICE_MODELS[key] = (ck, ck.load_ar(device=str(device), dtype=dtype, attention=attention))
    return _DEVICE_MODELS[key]


def manifest(name, step):
    with open(os.path.join(GOLDEN, name, "manifest.json")) as f:
        return json.load(f)["steps"][step]


def rel_err(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------- golden inputs
def a1_tokens(name) -> VisualTokens:
    """The golden tokenisation of the test image (what captioning the image feeds the LLM)."""
    g = golden(name, "a_bsq_tokenize")
    _, h, w = g["a1.image_grid_thw"][0].tolist()
    return VisualTokens.from_bits(g["a1.codes_tokens"][None], h * 16, w * 16)


def c1_edit_tokens(name) -> VisualTokens:
    """The edit input of golden c1 as tokens: its pixel values through the CPU model's encoder (parity-tested
    bitwise).  The device's own encoder is checked against the CPU in test_vision_encoder_on_device."""
    g = golden(name, "c1_edit_64x64_cfg1.5")
    grid = tuple(g["input_image_grid_thw"][0].tolist())
    _, cpu = load_model(name)
    with torch.inference_mode():
        bits = cpu.visual.encode_bits(g["pixel_values"][: grid[0] * grid[1] * grid[2]], [grid])
    return VisualTokens.from_bits(bits[None], grid[1] * 16, grid[2] * 16, fingerprint=cpu.fingerprint)


def safe_steps(g, c, eps, temperature=1.0) -> int:
    """How many leading steps of golden ``g`` must give the golden's tokens when every logit is within ``eps`` of
    the golden's.  A bit is 1 iff (z1 - z0) - (log E1 - log E0) > 0, with z the CFG-mixed logits / temperature and
    E the CPU stream's exponentials in the sampler's order (sampling/image.py), for every row (the unconditional
    rows' bits are their next inputs); logits within eps move that by at most 2 * (2 cfg - 1) * eps / temperature.
    Steps are safe up to the first whose smallest |decision| is not above that."""
    assert c["cfg"] > 1  # rows = conditional half + unconditional half
    logits = g["vistok_head_logits"]  # (N, R, O)
    n_steps, rows, out = logits.shape
    shift = 2 * (2 * c["cfg"] - 1) * eps / temperature
    shape = g["indices"].shape[2:]  # (levels, unit): one token
    gen = torch.Generator().manual_seed(c["seed"])
    for i in range(n_steps):
        cond, uncond = logits[i, : rows // 2], logits[i, rows // 2 :]
        z = ((uncond + c["cfg"] * (cond - uncond)) / temperature).reshape(1, -1, 2)
        e = torch.empty(rows * out // 2, 2).exponential_(1, generator=gen).view(2, -1, 2)
        s = (z[..., 1] - z[..., 0]) - (e[..., 1].log() - e[..., 0].log())
        bits = (s > 0).long().view(rows, *shape, out // 2 // shape.numel())
        assert torch.equal(bits_to_indices(bits[:1]), g["indices"][:, i])  # the replica draws the golden's bits
        if s.abs().min().item() <= shift:
            return i
    return n_steps


@pytest.fixture
def cpu_stream(monkeypatch):
    """The samplers draw from the CPU generator's stream, from the device's logits.

    The goldens' tokens come from the CPU stream (mt19937); a CUDA generator (Philox) gives another stream for the
    same seed, so the device's tokens could never equal them.  Here the fast sampler's ``_Sampler`` and the
    reference loop's ``mix_and_sample`` run on the CPU with a CPU generator seeded like the device's one: the
    network runs on the device, the draws are the goldens'.  On the CPU this is exactly the unpatched sampler."""
    from uniar_backend.sampling import image as sampling_image

    real_sampler, real_mix = sampling_image._Sampler, sampling_image.mix_and_sample

    class CpuStreamSampler:
        def __init__(self, R, shape, cfg, use_cfg, temperature, generator, dev, dtype):
            cpu_gen = torch.Generator().manual_seed(generator.initial_seed())
            self.inner = real_sampler(R, shape, cfg, use_cfg, temperature, cpu_gen, torch.device("cpu"),
                                      torch.float32)
            self.dev = dev

        def __call__(self, logits):
            return self.inner(logits.float().cpu()).to(self.dev)

    streams = {}

    def cpu_mix(logits, cfg, use_cfg, temperature, shape, generator):
        if id(generator) not in streams:
            streams[id(generator)] = (generator, torch.Generator().manual_seed(generator.initial_seed()))
        bits = real_mix(logits.float().cpu(), cfg, use_cfg, temperature, shape, streams[id(generator)][1])
        return bits.to(logits.device)

    monkeypatch.setattr(sampling_image, "_Sampler", CpuStreamSampler)
    monkeypatch.setattr(sampling_image, "mix_and_sample", cpu_mix)


# ---------------------------------------------------------------------------------------------- 1. goldens, float32
@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("case", SMALL_CASES)
@pytest.mark.parametrize("name", CKPTS)
def test_generation_goldens_on_device(device, name, case, mode, cpu_stream):
    """float32 on the device, the goldens' seeds and draws (``cpu_stream``): the goldens' prefix exactly, image
    logits within LOGITS_EPS = 1e-4 (absolute; logits reach ~15; the CPU parity tests' every-step bound) of the
    golden's, and the golden's tokens, for the steps whose sampling margin 1e-4 cannot overturn (``safe_steps``:
    all 4 steps of every case here but uniar-tiny-bsq64 b1, whose step 1 has a margin of 2.3e-4 < 4e-4: its
    tokens are compared for step 0, its logits for steps 0 and 1).  The edit input (c1) enters as its
    CPU-encoded tokens (the same prefix; the device's encoder: test_vision_encoder_on_device)."""
    ck, m = device_model(name, device)
    g, c = golden(name, case), GEN_CASES[case]
    k = safe_steps(g, c, LOGITS_EPS)
    assert k >= 1
    info, logits = {}, []
    edit = c1_edit_tokens(name) if c["edit"] else None
    tokens = api.UniAR(ck, m).generate([c["prompt"]], c["height"], c["width"], cfg=c["cfg"], temperature=1.0,
                                       seed=c["seed"], edit_tokens=edit, mode=mode, logits_out=logits, info=info)
    assert torch.equal(info["input_ids"].cpu(), g["prefix_input_ids"])
    assert torch.equal(info["attention_mask"].cpu(), g["attention_mask"])
    assert torch.equal(info["positions"].cpu(), g["pos_ids_all"])
    got = torch.stack(logits)
    assert got.shape == g["vistok_head_logits"].shape
    err = (got[: k + 1] - g["vistok_head_logits"][: k + 1]).abs().max().item()
    assert err <= LOGITS_EPS, f"logits differ from the golden by {err:.3g} (steps 0..{min(k, len(got) - 1)})"
    assert torch.equal(tokens.indices[:, :k], g["indices"][:, :k]), f"tokens differ within the first {k} steps"


@pytest.mark.parametrize("name", CKPTS)
def test_caption_golden_on_device(device, name):
    """Greedy caption of the test image (its golden tokenisation, a1) in float32 on the device: the golden's
    prompt ids and positions, scores within LOGITS_EPS = 1e-4 of the golden at every step, the golden's answer ids
    and text.  The golden's smallest top-1 / top-2 gap (2.1e-3) exceeds 2 * 1e-4, so greedy cannot flip."""
    ck, m = device_model(name, device)
    g = golden(name, "e1_understand")
    top2 = g["scores"].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min().item() > 2 * LOGITS_EPS
    info = {}
    answer = api.UniAR(ck, m).caption("What is in this image?", tokens=a1_tokens(name), max_new_tokens=16, info=info)
    assert torch.equal(info["input_ids"][0].cpu(), g["input_ids"])
    assert torch.equal(info["positions"][0].cpu(), g["position_ids"])
    assert info["output_ids"][0] == g["output_ids"][0].tolist()
    err = (info["scores"][0] - g["scores"][0]).abs().max().item()
    assert err <= LOGITS_EPS, f"scores differ from the golden by {err:.3g}"
    assert answer == [manifest(name, "e1_understand")["output_text"]]


@pytest.mark.parametrize("name", CKPTS)
def test_vision_encoder_on_device(device, name):
    """The vision tower + BSQ in float32 on the device, on the goldens' pixel values (a1: captioning, c1: edit
    input), against the CPU: the normalised BSQ inputs z within Z_EPS = 1e-5 (absolute; |z| <= 1) at every level,
    and the same bits for every (patch, level) whose smallest |z| on the CPU exceeds Z_EPS (a sign closer to 0
    than the bound may legitimately differ; bsq64's smallest |z| is ~1.5e-6).  The golden bits -> LLM features
    within FEATURE_EPS = 1e-4 of the golden's."""
    from uniar_backend.modeling.vision import _level_name

    _, m = device_model(name, device)
    _, cpu = load_model(name)
    a1, c1 = golden(name, "a_bsq_tokenize"), golden(name, "c1_edit_64x64_cfg1.5")
    grid_c1 = tuple(c1["input_image_grid_thw"][0].tolist())
    inputs = [(a1["a1.pixel_values"], tuple(a1["a1.image_grid_thw"][0].tolist())),
              (c1["pixel_values"][: grid_c1[0] * grid_c1[1] * grid_c1[2]], grid_c1)]
    levels = m.cfg.vision.levels

    def encode(model, pv, grid):
        zs = []
        hooks = [getattr(model.visual, _level_name("input", lv)).register_forward_hook(
            lambda mod, args, out: zs.append(F.normalize(out.float(), dim=-1).cpu())) for lv in range(levels)]
        try:
            with torch.inference_mode():
                bits = model.visual.encode_bits(pv.to(model.device), [grid], model.attention)
        finally:
            for h in hooks:
                h.remove()
        n, _, unit, d = bits.shape  # (tokens, levels, unit, d) -> (patches, levels, d) like z
        return torch.stack(zs, 1), bits.cpu().transpose(1, 2).reshape(n * unit, levels, d)

    for pv, grid in inputs:
        z_dev, bits_dev = encode(m, pv, grid)
        z_cpu, bits_cpu = encode(cpu, pv, grid)
        err = (z_dev - z_cpu).abs().max().item()
        assert err <= Z_EPS, f"z differs from the CPU by {err:.3g}"
        clear = z_cpu.abs().amin(-1) > Z_EPS  # (patches, levels)
        assert clear.float().mean() > 0.9  # the comparison covers nearly every token (>= 99.5% here)
        assert torch.equal(bits_dev[clear], bits_cpu[clear])

    with torch.inference_mode():
        main, deep = m.visual.bits_to_features(a1["a1.codes_tokens"].to(device))
    assert (main.cpu() - a1["a1.features_llm_main"]).abs().max().item() <= FEATURE_EPS
    for k, dk in enumerate(deep):
        assert (dk.cpu() - a1[f"a1.features_llm_deepstack{k}"]).abs().max().item() <= FEATURE_EPS


# ---------------------------------------------------------------------------------------------- 2. bfloat16
@pytest.mark.parametrize("name", CKPTS)
def test_bf16_logits_close_to_float32(device, name):
    """One prefill (b1, first-step image logits) in bfloat16 vs float32 on the device: max |diff| <= BF16_REL =
    5% of the float32 logits' max |.| (measured on the CPU: 1.2% / 1.9% for uniar-tiny / -bsq64; the bf16
    golden itself is up to 3.3% from the float32 one)."""
    c = GEN_CASES["b1_t2i_64x64_cfg1.5"]
    first = {}
    for dtype in ("float32", "bfloat16"):
        ck, m = device_model(name, device, dtype)
        logits = []
        api.UniAR(ck, m).generate([c["prompt"]], c["height"], c["width"], cfg=c["cfg"], seed=c["seed"],
                                  logits_out=logits)
        first[dtype] = logits[0]
    err = rel_err(first["bfloat16"], first["float32"])
    assert err <= BF16_REL, f"bfloat16 logits {err:.2%} of the range from float32"


# ---------------------------------------------------------------------------------------------- 3. CUDA graph
@pytest.mark.parametrize("case", SMALL_CASES)
@pytest.mark.parametrize("name", CKPTS)
def test_cuda_graph_step_equals_eager(device, name, case, monkeypatch):
    """The fast sampler with its CUDA-graph step (UNIAR_CUDA_GRAPH=1) vs its eager step, float32, same seed (the
    device's own stream): the same tokens, logits within 1e-4 (the static step attends over the whole zeroed cache
    under a mask: not bitwise).  CUDA only."""
    _cuda_only(device, "the CUDA-graph step")
    from uniar_backend.sampling import image as sampling_image

    graphs = []

    class RecordedGraphStep(sampling_image._GraphStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            graphs.append(self)

    monkeypatch.setattr(sampling_image, "_GraphStep", RecordedGraphStep)
    ck, m = device_model(name, device)
    c = GEN_CASES[case]
    edit = c1_edit_tokens(name) if c["edit"] else None
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIAR_CUDA_GRAPH", flag)
        logits = []
        tokens = api.UniAR(ck, m).generate([c["prompt"]], c["height"], c["width"], cfg=c["cfg"], seed=c["seed"],
                                           edit_tokens=edit, logits_out=logits)
        runs[flag] = (tokens.indices, torch.stack(logits))
        assert bool(graphs) == (flag == "1")  # the graph run really captured (and the eager one did not)
    assert graphs[0].graph is not None
    assert torch.equal(runs["0"][0], runs["1"][0])
    assert (runs["0"][1] - runs["1"][1]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------- 4. flash-attention
def compare_attention(device, name, backend, cache_dir) -> dict:
    """Relative max differences (to the sdpa result's max |.|) of ``backend`` vs sdpa, both bfloat16, where the
    pack calls the attention kernel without a mask: every vision block's output (a1 pixel values), the caption
    prefill's scores (a1 tokens), the DiT's first noise prediction (d1 tokens)."""
    from uniar_backend.decoder import load_decoder

    a1 = golden(name, "a_bsq_tokenize")
    pv, grid = a1["a1.pixel_values"].to(device), tuple(a1["a1.image_grid_thw"][0].tolist())
    mf, g = manifest(name, "d1_decode_b1_x2"), golden(name, "d1_decode_b1_x2")
    blocks, scores, noise = {}, {}, {}
    for att in ("sdpa", backend):
        ck, m = device_model(name, device, "bfloat16", att)
        blocks[att] = []
        hooks = [b.register_forward_hook(lambda mod, args, o, acc=blocks[att]: acc.append(o.float().cpu()))
                 for b in m.visual.blocks]
        try:
            with torch.inference_mode():
                m.visual.encode_bits(pv, [grid], m.attention)
        finally:
            for h in hooks:
                h.remove()
        info = {}
        api.UniAR(ck, m).caption("What is in this image?", tokens=a1_tokens(name), max_new_tokens=2, info=info)
        scores[att] = info["scores"][0][0]
        dec = load_decoder(ckpt_path(name), device=str(device), dtype="bfloat16", attention=att, cache_dir=cache_dir)
        tok = VisualTokens(g["indices"], mf["ar_height"], mf["ar_width"], dec.bsq_dim, dec.levels, dec.merge_unit)
        trace = {}
        dec.decode(tok, steps=1, guidance=mf["guidance_scale"], upsampling_ratio=mf["upsampling_ratio"],
                   seed=mf["generator_seed"], trace=trace)
        noise[att] = trace["noise_preds"][0]
    return {"vision": [rel_err(a, b) for a, b in zip(blocks[backend], blocks["sdpa"])],
            "caption": [rel_err(scores[backend], scores["sdpa"])], "dit": [rel_err(noise[backend], noise["sdpa"])]}


@pytest.mark.parametrize("name", CKPTS)
def test_flash_attention_matches_sdpa(device, name, tmp_path):
    """flash-attention 2 vs sdpa, bfloat16 (flash runs in half precision only), on the device: every vision block
    output, the caption prefill's scores and the DiT's first noise prediction within FLASH_REL = 3% of the sdpa
    result's max |.| (on the CPU, eager vs sdpa in bfloat16 differ by <= 1.0% on these, bfloat16 vs float32 by
    <= 1.4%).  CUDA with the flash_attn package only."""
    _cuda_only(device, "flash-attention")
    from uniar_backend.runtime import flash_attn_available

    if not flash_attn_available():
        pytest.skip("the flash_attn package is not installed")
    diffs = compare_attention(device, name, "flash_attention_2", str(tmp_path))
    assert all(d <= FLASH_REL for ds in diffs.values() for d in ds), diffs


# ---------------------------------------------------------------------------------------------- 5. quantised layers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quant_linear_on_device(device, fmt, dtype):
    """``QuantLinear`` (weights quantised on the CPU, moved to the device): its dequantised weight on the device
    equals the format's CPU ``dequantize`` bitwise (elementwise float32 ops), and its forward on the device is
    ``F.linear(x, CPU dequantisation, bias)`` (float32 on the CPU) within QUANT_REL of the output's max |.|:
    1e-5 in float32, 2% in bfloat16 (measured on the CPU: <= 0.6%).  fp8 only where ``check_device`` allows."""
    from uniar_backend.errors import InputError
    from uniar_backend.quant.formats import check_device, get
    from uniar_backend.quant.layers import QuantLinear

    f = get(fmt)
    try:
        check_device(f, device)
    except InputError as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    bias = torch.randn(96, generator=g) * 0.1
    x = torch.randn(5, 256, generator=g)
    t = f.quantize(w)
    layer = QuantLinear(256, 96, True, f, torch.float32)
    for k, v in t.items():
        getattr(layer, k).data = v.clone()
    layer.bias.data = bias.clone()
    layer = layer.to(device=device, dtype=dtype)
    assert layer.weight.device.type == device.type and layer.weight.dtype == f.storage
    want_w = f.dequantize(t, torch.float32)
    assert torch.equal(layer.dequantized(torch.float32).cpu(), want_w)
    want = F.linear(x, want_w, bias)
    with torch.inference_mode():
        got = layer(x.to(device, dtype))
    assert got.dtype == dtype and got.device.type == device.type
    err = rel_err(got.float(), want)
    assert err <= QUANT_REL[dtype], f"{fmt} {dtype}: {err:.3g} of the range"


# ---------------------------------------------------------------------------------------------- 6. the decoder
@pytest.mark.parametrize("name", CKPTS)
def test_decoder_on_device(device, name, tmp_path):
    """The image decoder (prompt encoders, DiT, VAE) in float32 on the device from golden d1's tokens: within 1
    level (of 255) of the golden image everywhere, as tests/test_decoder.py checks on the CPU (the initial noise
    is drawn on the CPU, so it is the golden's on any device)."""
    from uniar_backend.decoder import load_decoder, to_uint8

    dec = load_decoder(ckpt_path(name), device=str(device), dtype="float32", attention="sdpa",
                       cache_dir=str(tmp_path))  # a fresh cache: the prompt is encoded on the device too
    mf, g = manifest(name, "d1_decode_b1_x2"), golden(name, "d1_decode_b1_x2")
    tok = VisualTokens(g["indices"], mf["ar_height"], mf["ar_width"], dec.bsq_dim, dec.levels, dec.merge_unit)
    trace = {}
    img = dec.decode(tok, steps=mf["num_inference_steps"], guidance=mf["guidance_scale"],
                     upsampling_ratio=mf["upsampling_ratio"], seed=mf["generator_seed"], trace=trace)
    assert img.shape == (1, mf["target_height"], mf["target_width"], 3) and img.dtype == torch.float32
    got = to_uint8(img)[0].to(torch.int16)
    png = torch.from_numpy(np.array(Image.open(os.path.join(GOLDEN, name, "d1_decode_b1_x2.png")).convert("RGB")))
    diag = {k: (trace[k] - g[gk]).abs().max().item() for k, gk in
            (("vae_input", "vae_input_latents"), ("vae_output", "vae_output"))}
    assert (got - png.to(torch.int16)).abs().max().item() <= 1, diag
    assert (got - g["image_uint8"].to(torch.int16)).abs().max().item() <= 1, diag


# ---------------------------------------------------------------------------------------------- 7. batch runs
def test_batch_run_on_device_is_deterministic(device, tmp_path):
    """``python -m uniar_backend batch`` on the device (the process's device is ``cuda:LOCAL_RANK``): one seed per
    prompt drawn from a generator on the device, prompts batched with their own streams equal to each alone, and
    the same command twice gives byte-identical tokens and images."""
    from conftest import run_cli

    ck, m = device_model("uniar-tiny", device)
    prompts = ["A red cube on a blue table.", "A cat", "two dogs running on the beach at sunset"]
    together = api._generate(m, ck, prompts, 64, 64, cfg=2.0, temperature=0.1, seed=[7, 8, 9])
    for i, s in enumerate([7, 8, 9]):
        alone = api._generate(m, ck, [prompts[i]], 64, 64, cfg=2.0, temperature=0.1, seed=s)
        assert torch.equal(together.indices[i], alone.indices[0]), i
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"idx": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_cli("batch", "--model", ckpt_path("uniar-tiny"), "--prompts", str(path), "--out", str(out), "--device",
                str(device), "--dtype", "float32", "--height", "64", "--width", "64", "--steps", "2",
                "--samples-per-prompt", "2", "--batch-size", "3")
        files = {}
        for d, _, fs in os.walk(out):
            for f in fs:
                if not f.startswith("summary"):
                    files[os.path.relpath(os.path.join(d, f), out)] = open(os.path.join(d, f), "rb").read()
        runs.append(files)
    assert len([f for f in runs[0] if f.endswith(".png")]) == 6 and runs[0] == runs[1]
    runtime = json.loads(runs[0]["uniar_runtime-ar.json"])["runtime"]
    assert runtime["device_type"] == device.type
