"""Image decoder (tokens -> image) against the reference goldens on the tiny fixtures (float32, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from uniar_backend.errors import CheckpointError, InputError, TokenError, UniARError
from uniar_backend.tokens import VisualTokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.abspath(os.path.join(REPO, "..", "shared", "fixtures"))
if not os.path.isdir(FIXTURES):
    FIXTURES = "/work/shared/fixtures"
GOLDEN = os.path.join(FIXTURES, "golden")
CKPTS = {"uniar-tiny": 16, "uniar-tiny-bsq64": 64}
DECODES = ("d1_decode_b1_x2", "d2_decode_b3_x1", "d4_decode_c1_x2")

pytestmark = pytest.mark.skipif(not os.path.isdir(GOLDEN), reason="shared fixtures not found")


# ---------------------------------------------------------------------------------------------- helpers
def golden(golden_set: str, name: str):
    manifest = json.load(open(os.path.join(GOLDEN, golden_set, "manifest.json")))["steps"][name]
    tensors = load_file(os.path.join(GOLDEN, golden_set, f"{name}.safetensors"))
    png = np.array(Image.open(os.path.join(GOLDEN, golden_set, f"{name}.png")).convert("RGB"))
    return manifest, tensors, png


def golden_tokens(ckpt: str, name: str, golden_set: str | None = None) -> tuple[dict, dict, np.ndarray, VisualTokens]:
    m, g, png = golden(golden_set or ckpt, name)
    tok = VisualTokens(g["indices"], m["ar_height"], m["ar_width"], CKPTS[ckpt], 4, 4)
    return m, g, png, tok


def maxdiff(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def decode_golden(dec, m, tok, **kw):
    return dec.decode(tok, steps=m["num_inference_steps"], guidance=m["guidance_scale"],
                      upsampling_ratio=m["upsampling_ratio"], seed=m["generator_seed"], **kw)


def link_checkpoint(src: str, dst: str) -> str:
    """A checkpoint folder of symlinks (sd3_pipeline/ gets real folders so parts can be deleted)."""
    os.makedirs(os.path.join(dst, "sd3_pipeline"))
    for name in os.listdir(src):
        if name != "sd3_pipeline":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    for name in os.listdir(os.path.join(src, "sd3_pipeline")):
        os.symlink(os.path.join(src, "sd3_pipeline", name), os.path.join(dst, "sd3_pipeline", name))
    return dst


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far too small for intra-op threads (the goldens were made with one thread too);
    one thread is several times cheaper here, above all on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prompt_cache"))


@pytest.fixture(scope="module")
def decoders(cache_dir):
    from uniar_backend.decoder import load_decoder

    return {ck: load_decoder(os.path.join(FIXTURES, ck), device="cpu", dtype="float32", attention="sdpa",
                             cache_dir=cache_dir) for ck in CKPTS}


# ---------------------------------------------------------------------------------------------- goldens
@pytest.mark.parametrize("ckpt", list(CKPTS))
@pytest.mark.parametrize("name", DECODES)
def test_decode_matches_golden(decoders, ckpt, name):
    from uniar_backend.decoder import to_uint8

    m, g, png, tok = golden_tokens(ckpt, name)
    trace = {}
    img = decode_golden(decoders[ckpt], m, tok, trace=trace)
    assert img.shape == (1, m["target_height"], m["target_width"], 3) and img.dtype == torch.float32
    assert maxdiff(trace["siglip_tensor"], g["siglip_tensor"]) <= 1e-5
    assert maxdiff(trace["initial_latents"], g["initial_latents"]) == 0
    assert maxdiff(torch.stack(trace["noise_preds"]), g["transformer_noise_pred_per_step"]) <= 1e-4
    assert maxdiff(trace["vae_input"], g["vae_input_latents"]) <= 1e-4
    assert maxdiff(trace["vae_output"], g["vae_output"]) <= 1e-4
    assert maxdiff(to_uint8(img)[0], png) <= 1
    assert maxdiff(to_uint8(img)[0], g["image_uint8"]) <= 1


def test_eager_attention_matches_golden(cache_dir):
    from uniar_backend.decoder import load_decoder

    dec = load_decoder(os.path.join(FIXTURES, "uniar-tiny"), "cpu", "float32", attention="eager", cache_dir=cache_dir)
    m, g, _, tok = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    trace = {}
    decode_golden(dec, m, tok, trace=trace)
    assert maxdiff(trace["vae_output"], g["vae_output"]) <= 1e-4


def test_bfloat16_close_to_bf16_golden(tmp_path):
    """Upstream in bf16 (golden made with torch 2.14.1): siglip features and noise are bit-identical; the DiT
    then differs by bf16 rounding of other torch CPU kernels only."""
    from uniar_backend.decoder import load_decoder, to_uint8

    dec = load_decoder(os.path.join(FIXTURES, "uniar-tiny-bsq64"), "cpu", "bfloat16", cache_dir=str(tmp_path))
    emb = dec.prompt_embeddings()
    m, g, png, tok = golden_tokens("uniar-tiny-bsq64", "d1_decode_b1_x2", "uniar-tiny-bsq64-bf16")
    assert maxdiff(emb.prompt_embeds, g["prompt_embeds"]) == 0 and maxdiff(emb.pooled, g["pooled_prompt_embeds"]) == 0
    trace = {}
    img = decode_golden(dec, m, tok, trace=trace)
    assert maxdiff(trace["siglip_tensor"], g["siglip_tensor"]) == 0
    assert maxdiff(trace["initial_latents"], g["initial_latents"]) == 0
    assert maxdiff(trace["noise_preds"][0], g["transformer_noise_pred_per_step"][0]) <= 0.05
    assert maxdiff(trace["vae_output"], g["vae_output"]) <= 0.2
    diff = (to_uint8(img)[0].double() - torch.from_numpy(png).double()).abs()
    assert diff.mean() <= 1.0


# ---------------------------------------------------------------------------------------------- prompt cache
def test_cached_embeddings_equal_fresh_and_golden(decoders, cache_dir):
    """The cache file (written when the decoders were loaded) holds exactly what a fresh encoding gives."""
    from uniar_backend.decoder import encode_prompt, prompt, prompt_embeddings

    root = os.path.join(FIXTURES, "uniar-tiny-bsq64")
    fresh = encode_prompt(root, None, "cpu", "float32")
    name = prompt.cache_file_name(prompt.DEFAULT_DECODER_PROMPT, torch.float32, prompt.encoder_fingerprint(root))
    assert os.path.isfile(os.path.join(cache_dir, name))
    assert not [f for f in os.listdir(cache_dir) if f.startswith(".") or f.endswith(".tmp")]  # atomic writes
    cached = prompt_embeddings(root, None, "cpu", "float32", cache_dir=cache_dir)
    assert torch.equal(cached.prompt_embeds, fresh.prompt_embeds) and torch.equal(cached.pooled, fresh.pooled)
    _, g, _ = golden("uniar-tiny-bsq64", "d1_decode_b1_x2")
    assert list(cached.prompt_embeds.shape) == [1, 333, 48]  # 77 CLIP + 256 T5 tokens
    assert maxdiff(cached.prompt_embeds, g["prompt_embeds"]) <= 1e-5
    assert maxdiff(cached.pooled, g["pooled_prompt_embeds"]) <= 1e-5
    assert maxdiff(g["prompt_embeds"], g["negative_prompt_embeds"]) == 0


def test_default_cache_dir(tmp_path):
    from uniar_backend.decoder import default_cache_dir

    ckpt = tmp_path / "MyModel"
    ckpt.mkdir()
    assert default_cache_dir(str(ckpt)) == str(ckpt / ".uniar_cache")
    ckpt.chmod(0o555)  # read-only checkpoint folder (honoured even when running as root)
    try:
        d = default_cache_dir(str(ckpt))
        assert not d.startswith(str(ckpt)) and os.path.basename(d).startswith("MyModel-")
    finally:
        ckpt.chmod(0o755)


def test_decode_without_text_encoders(tmp_path, monkeypatch):
    """Once the cache exists, decoding needs no text-encoder file: delete them and get the identical image."""
    from uniar_backend.decoder import load_decoder, prompt

    root = link_checkpoint(os.path.join(FIXTURES, "uniar-tiny"), str(tmp_path / "ckpt"))
    cache = str(tmp_path / "cache")
    m, _, _, tok = golden_tokens("uniar-tiny", "d4_decode_c1_x2")
    before = decode_golden(load_decoder(root, "cpu", "float32", cache_dir=cache), m, tok)
    for part in prompt.ENCODERS + prompt.TOKENIZERS:
        os.unlink(os.path.join(root, "sd3_pipeline", part))

    def no_encoding(*a, **k):
        raise AssertionError("text encoders must not be loaded when the cache exists")

    monkeypatch.setattr(prompt, "encode_prompt", no_encoding)
    dec = load_decoder(root, "cpu", "float32", cache_dir=cache)
    after = decode_golden(dec, m, tok)
    assert torch.equal(before, after)
    # a prompt that was never cached needs the encoders: clear error naming what is missing
    with pytest.raises(CheckpointError, match="text_encoder"):
        dec.decode(tok, steps=1, decoder_prompt="a different prompt")


def test_custom_prompt_encoded_once(monkeypatch, decoders, cache_dir):
    from uniar_backend.decoder import load_decoder, prompt

    root = os.path.join(FIXTURES, "uniar-tiny")
    calls = []
    real = prompt.encode_prompt
    monkeypatch.setattr(prompt, "encode_prompt", lambda *a, **k: calls.append(a) or real(*a, **k))
    dec = load_decoder(root, "cpu", "float32", cache_dir=cache_dir)  # default prompt: already cached
    assert calls == []
    _, _, _, tok = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    a = dec.decode(tok, steps=2, seed=1, decoder_prompt="A sharp photo.")
    b = dec.decode(tok, steps=2, seed=1, decoder_prompt="A sharp photo.")
    assert len(calls) == 1 and torch.equal(a, b)
    c = load_decoder(root, "cpu", "float32", cache_dir=cache_dir).decode(tok, steps=2, seed=1,
                                                                          decoder_prompt="A sharp photo.")
    assert len(calls) == 1 and torch.equal(a, c)  # a new decoder reads the prompt from its cache file
    assert not torch.equal(a, dec.decode(tok, steps=2, seed=1))  # the prompt matters


# ---------------------------------------------------------------------------------------------- semantics
def test_non_square_tokens_with_upsampling(decoders):
    """Upstream fails here (golden d3); we resample on the true 6x8 patch grid."""
    dec = decoders["uniar-tiny"]
    m, _, _, tok = golden_tokens("uniar-tiny", "d2_decode_b3_x1")
    assert (tok.ar_height, tok.ar_width) == (96, 128)
    img = dec.decode(tok, steps=2, guidance=1.5, upsampling_ratio=1.5, seed=43)
    assert img.shape == (1, 144, 192, 3)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    # the fix is the identity where upstream works: square grid at ratio 2, non-square grid at ratio 1
    dit = dec.transformer
    x = torch.randn(1, 16, dit.siglip_channels)
    assert torch.equal(dit.embed_token_features(x, (8, 8), (4, 4)), dit.embed_token_features(x, (8, 8)))
    y = torch.randn(1, 48, dit.siglip_channels)
    assert torch.equal(dit.embed_token_features(y, (6, 8), (6, 8)), dit.embed_token_features(y, (6, 8)))


def test_batch_and_png_writer(decoders, tmp_path):
    from uniar_backend.decoder import save_images, to_uint8
    from uniar_backend.fileio import new_file_mode

    dec = decoders["uniar-tiny"]
    _, g1, _, t1 = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    _, _, _, t4 = golden_tokens("uniar-tiny", "d4_decode_c1_x2")
    batch = VisualTokens.cat([t1, t4])
    trace = {}
    imgs = dec.decode(batch, steps=2, seed=7, trace=trace)
    assert imgs.shape == (2, 64, 64, 3)
    # one draw over the whole batch shape, as diffusers' randn_tensor with one CPU generator
    expect = torch.randn((2, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(trace["initial_latents"], expect)
    paths = save_images(imgs, str(tmp_path / "IMG.png"))
    assert [os.path.basename(p) for p in paths] == ["IMG_00000.png", "IMG_00001.png"]
    for p, im in zip(paths, imgs, strict=True):
        assert np.array_equal(np.array(Image.open(p)), to_uint8(im).numpy())
        assert os.stat(p).st_mode & 0o777 == new_file_mode()  # not mkstemp's 0600
    assert save_images(imgs[:1], str(tmp_path / "one.png")) == [str(tmp_path / "one.png")]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_callback_and_cancel(decoders):
    dec = decoders["uniar-tiny"]
    m, _, _, tok = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    seen = []
    ref = decode_golden(dec, m, tok, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    class Cancelled(Exception):
        pass

    def cancel(i, n):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        decode_golden(dec, m, tok, callback=cancel)
    assert torch.equal(decode_golden(dec, m, tok), ref)  # nothing left broken


def test_guidance_at_most_one_disables_cfg(decoders):
    dec = decoders["uniar-tiny"]
    _, _, _, tok = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    trace = {}
    dec.decode(tok, steps=1, guidance=1.0, trace=trace)
    assert trace["noise_preds"][0].shape[0] == 1  # only the conditional row, as diffusers


# ---------------------------------------------------------------------------------------------- bad inputs
def test_tokens_of_another_model(decoders):
    _, _, _, tok64 = golden_tokens("uniar-tiny-bsq64", "d1_decode_b1_x2")
    with pytest.raises(TokenError, match="incompatible model"):
        decoders["uniar-tiny"].decode(tok64, steps=1)


@pytest.mark.parametrize("ratio,msg", [(2.5, "between 1 and 2"), (0.5, "between 1 and 2"), (1.1, "multiples of 16"),
                                       (float("nan"), "number")])
def test_bad_ratio(decoders, ratio, msg):
    _, _, _, tok = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    with pytest.raises(InputError, match=msg):
        decoders["uniar-tiny"].decode(tok, steps=1, upsampling_ratio=ratio)


@pytest.mark.parametrize("kw,msg", [({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"steps": 2.5}, "steps"),
                                    ({"guidance": float("inf")}, "guidance"), ({"seed": -1}, "seed")])
def test_bad_arguments(decoders, kw, msg):
    _, _, _, tok = golden_tokens("uniar-tiny", "d1_decode_b1_x2")
    with pytest.raises(InputError, match=msg):
        decoders["uniar-tiny"].decode(tok, **kw)


def test_empty_batch():
    """No tokens value holds zero images (a file claiming so is refused on load), so nothing decodes or captions
    an empty batch into an empty result."""
    with pytest.raises(TokenError, match="hold 0 images"):
        VisualTokens(torch.zeros(0, 4, 4, 4, dtype=torch.int64), 64, 64, 16, 4, 4)


def _copy_ckpt(tmp_path, *, drop=(), truncate=None, garbage=None):
    root = str(tmp_path / "ckpt")
    src = os.path.join(FIXTURES, "uniar-tiny")
    # everything but the AR weights (the decoder never reads them)
    shutil.copytree(src, root, ignore=lambda d, names: ["model.safetensors"] if d == src else [])
    for rel in drop:
        p = os.path.join(root, rel)
        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    for rel, func in ((truncate, lambda d: d[: len(d) // 2]), (garbage, lambda d: b"\x00garbage" * 10)):
        if rel:
            p = os.path.join(root, rel)
            data = open(p, "rb").read()
            os.chmod(p, 0o644)
            open(p, "wb").write(func(data))
    return root


@pytest.mark.parametrize("case,msg", [
    ({"drop": ["sd3_transformer"]}, "sd3_transformer/"),
    ({"drop": ["sd3_pipeline/vae"]}, "sd3_pipeline/vae/"),
    ({"drop": ["sd3_pipeline/scheduler"]}, "scheduler_config.json"),
    ({"drop": ["bsq_encoder/model.safetensors"]}, "bsq_encoder: no model.safetensors"),
    ({"truncate": "sd3_transformer/diffusion_pytorch_model.safetensors"},
     "sd3_transformer/diffusion_pytorch_model.safetensors.*truncated"),
    ({"garbage": "sd3_pipeline/vae/diffusion_pytorch_model.safetensors"},
     "vae/diffusion_pytorch_model.safetensors.*not a valid"),
])
def test_broken_checkpoint(tmp_path, case, msg):
    from uniar_backend.decoder import load_decoder

    root = _copy_ckpt(tmp_path, **case)
    with pytest.raises(CheckpointError, match=msg):
        load_decoder(root, "cpu", "float32", cache_dir=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache")  # failed before any prompt encoding


# ---------------------------------------------------------------------------------------------- CLI
def _tokens_file(tmp_path, ckpt="uniar-tiny", name="d1_decode_b1_x2") -> tuple[str, dict, np.ndarray]:
    m, _, png, tok = golden_tokens(ckpt, name)
    path = str(tmp_path / "tokens.safetensors")
    tok.save(path)
    return path, m, png


def _decode_argv(ckpt, tokens, m, cache, out):
    return ["decode", "--model", os.path.join(FIXTURES, ckpt), "--tokens", tokens,
            "--steps", str(m["num_inference_steps"]), "--guidance", str(m["guidance_scale"]),
            "--upsampling-ratio", str(m["upsampling_ratio"]), "--seed", str(m["generator_seed"]),
            "--cache-dir", cache, "--out", out, "--device", "cpu", "--dtype", "float32"]


def test_cli_decode_in_process(tmp_path, cache_dir, capsys):
    from uniar_backend import cli

    tokens, m, png = _tokens_file(tmp_path, "uniar-tiny-bsq64", "d4_decode_c1_x2")
    out = str(tmp_path / "img.png")
    assert cli.main(_decode_argv("uniar-tiny-bsq64", tokens, m, cache_dir, out)) == 0
    assert capsys.readouterr().out.strip() == out
    assert maxdiff(np.array(Image.open(out)), png) <= 1
    # errors: one line on stderr, exit status 2, nothing written
    bad = _decode_argv("uniar-tiny", tokens, m, cache_dir, str(tmp_path / "bad.png"))
    assert cli.main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "incompatible model" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "bad.png")
    argv = _decode_argv("uniar-tiny-bsq64", tokens, m, cache_dir, str(tmp_path / "bad.png"))
    argv[argv.index("--upsampling-ratio") + 1] = "3"
    assert cli.main(argv) == 2 and "upsampling_ratio" in capsys.readouterr().err


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_decode_subprocess(tmp_path, cache_dir):
    """A fresh interpreter: importing the package must not import diffusers / transformers; then the decode
    sub-command runs end to end."""
    tokens, m, png = _tokens_file(tmp_path, "uniar-tiny", "d2_decode_b3_x1")
    out = str(tmp_path / "img.png")
    argv = _decode_argv("uniar-tiny", tokens, m, cache_dir, out)
    code = ("import sys, uniar_backend.decoder, uniar_backend.cli as c\n"
            "heavy = sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            f"sys.exit(c.main({argv!r}))")
    r = _run(["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out
    assert maxdiff(np.array(Image.open(out)), png) <= 1


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "uniar_backend", "__main__.py")),
                    reason="python -m uniar_backend (the main CLI) is not there yet")
def test_main_cli_decode(tmp_path, cache_dir):
    """``python -m uniar_backend decode`` (the lead's CLI dispatching to cli_decode.register)."""
    tokens, m, png = _tokens_file(tmp_path, "uniar-tiny-bsq64", "d1_decode_b1_x2")
    out = str(tmp_path / "img.png")
    r = _run(["-m", "uniar_backend", *_decode_argv("uniar-tiny-bsq64", tokens, m, cache_dir, out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert maxdiff(np.array(Image.open(out)), png) <= 1


def test_cli_t2i(tmp_path, cache_dir, capsys):
    pytest.importorskip("uniar_backend.api")
    from uniar_backend import cli

    out = str(tmp_path / "t2i.png")
    toks = str(tmp_path / "t2i_tokens.safetensors")
    argv = ["t2i", "--model", os.path.join(FIXTURES, "uniar-tiny"), "--prompt", "A red cube.", "--height", "64",
            "--width", "96", "--seed", "3", "--steps", "2", "--upsampling-ratio", "1.5", "--batch-size", "2",
            "--cache-dir", cache_dir, "--save-tokens", toks, "--out", out, "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == ["t2i_00000.png", "t2i_00001.png"]
    assert Image.open(printed[0]).size == (144, 96)
    assert VisualTokens.load(toks).indices.shape == (2, 6, 4, 4)
    # decode-side arguments are checked before the AR model runs
    argv[argv.index("--upsampling-ratio") + 1] = "1.1"
    assert cli.main(argv) == 2 and "multiples of 16" in capsys.readouterr().err


def test_errors_are_uniar_errors():
    for cls in (CheckpointError, InputError, TokenError):
        assert issubclass(cls, UniARError)


@pytest.mark.parametrize("side,ratio,msg", [(320, 2.0, "use upsampling_ratio 1.5 or less for these 320x320 tokens"),
                                            (544, 1.0, "the tokens alone are 544x544: generate or encode at most 512")])
def test_too_large_output_says_what_to_change(decoders, side, ratio, msg):
    """The fix named in the message fits the case: a ratio that works, or smaller tokens when even 1.0 is too big."""
    from uniar_backend.tokens import VisualTokens

    dec = decoders["uniar-tiny"]
    n = (side // 32) ** 2
    bits = torch.randint(0, 2, (1, n, dec.levels, dec.merge_unit, dec.bsq_dim), generator=torch.Generator().manual_seed(0))
    tok = VisualTokens.from_bits(bits, side, side, fingerprint=dec.fingerprint)
    with pytest.raises(InputError, match=msg):
        dec.check(tok, upsampling_ratio=ratio)
    if ratio > 1:
        assert dec.check(tok, upsampling_ratio=1.5) == (480, 480)


# ---------------------------------------------------------------------------------------------- the DiT module
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_module_equals_diffusers_sd3_transformer(dtype):
    """The pack's MMDiT computes exactly what diffusers' SD3Transformer2DModel computes with the same weights
    (without token features, which diffusers' module does not have), square and non-square grids."""
    from diffusers import SD3Transformer2DModel

    from uniar_backend.checkpoint import WeightFiles
    from uniar_backend.decoder import components as C
    from uniar_backend.decoder.sd3 import BASE_KEYS

    root = os.path.join(FIXTURES, "uniar-tiny")
    ours = C.load_transformer(root, "cpu", dtype)
    cfg = C.read_transformer_config(root)
    ref = SD3Transformer2DModel(**{k: tuple(cfg[k]) if k == "dual_attention_layers" else cfg[k]
                                   for k in BASE_KEYS if k in cfg})
    files = WeightFiles(os.path.join(root, "sd3_transformer"), "diffusion_pytorch_model")
    ref.load_state_dict(files.read([k for k in files.keys() if not k.startswith("siglip")]), strict=True)
    ref = ref.to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    for hw in ((8, 8), (6, 10)):
        lat = torch.randn(2, 16, *hw, generator=g).to(dtype)
        text = torch.randn(2, 7, cfg["joint_attention_dim"], generator=g).to(dtype)
        pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=g).to(dtype)
        t = torch.tensor([500.0, 500.0])
        with torch.no_grad():
            assert torch.equal(ours(lat, text, pooled, t)[0], ref(lat, text, pooled, t, return_dict=False)[0])


def test_dit_condition_computed_once_is_the_same_step():
    from uniar_backend.decoder import components as C

    dit = C.load_transformer(os.path.join(FIXTURES, "uniar-tiny"), "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 16, 8, 8, generator=g)
    text, pooled = torch.randn(2, 7, 48, generator=g), torch.randn(2, 40, generator=g)
    sig = torch.randn(2, 4, dit.siglip_channels, generator=g)
    cond = dit.condition(text, pooled, sig, (4, 4), (2, 2))
    with torch.no_grad():
        for t in (900.0, 100.0):
            ts = torch.tensor([t, t])
            assert torch.equal(dit(lat, timestep=ts, condition=cond)[0],
                               dit(lat, text, pooled, ts, siglip_tensor=sig, token_grid=(2, 2))[0])
    with pytest.raises(ValueError, match="latent grid"):
        dit(torch.randn(2, 16, 10, 10), timestep=torch.tensor([1.0, 1.0]), condition=cond)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_decoder_equals_diffusers_autoencoder(dtype):
    """The pack's VAE decoder computes exactly what diffusers' AutoencoderKL.decode computes with the checkpoint's
    weights (sdpa attention)."""
    from diffusers import AutoencoderKL

    from uniar_backend.checkpoint import WeightFiles
    from uniar_backend.decoder import components as C

    root = os.path.join(FIXTURES, "uniar-tiny")
    ours = C.load_vae(root, "cpu", dtype)
    ref = AutoencoderKL.from_config(C.read_vae_config(root))
    files = WeightFiles(os.path.join(root, C.VAE_DIR), "diffusion_pytorch_model")
    ref.load_state_dict(files.read(files.keys()), strict=True)
    ref = ref.to(dtype).eval()
    z = torch.randn(2, ref.config.latent_channels, 12, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours.decode(z)[0], ref.decode(z, return_dict=False)[0])


# ---------------------------------------------------------------------------------------------- native route pieces
def test_reference_sigmas_are_the_decoders_schedule():
    """4 steps: timesteps 1000, 857.69, 602.15, 8.93 (ARCHITECTURE.md section 7), final sigma 0, float32."""
    from uniar_backend.decoder.components import read_scheduler_config
    from uniar_backend.decoder.conditioning import reference_sigmas

    cfg = read_scheduler_config(os.path.join(FIXTURES, "uniar-tiny"))
    s = reference_sigmas(cfg, 4)
    assert s.dtype == torch.float32 and s.shape == (5,) and s[0] == 1 and s[-1] == 0
    assert np.allclose((s[:-1] * 1000).numpy(), [1000, 857.69, 602.15, 8.93], atol=0.01)
    with pytest.raises(InputError, match="steps"):
        reference_sigmas(cfg, 0)


def test_reference_noise_is_the_decoders_and_comfyuis_float32_draw(decoders):
    from uniar_backend.decoder.conditioning import reference_noise

    dec = decoders["uniar-tiny"]
    n = reference_noise((2, 16, 8, 12), 5, torch.float32)
    assert torch.equal(n, dec.initial_latents(2, 64, 96, 5))
    # ComfyUI's prepare_noise: torch.randn(float32) from torch.manual_seed(seed) on the CPU -- the same draw
    assert torch.equal(n, torch.randn((2, 16, 8, 12), generator=torch.Generator().manual_seed(5)))
    bf = reference_noise((1, 16, 8, 8), 5, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    with pytest.raises(InputError):
        reference_noise((1, 16, 8, 8), -1, torch.float32)


@pytest.mark.parametrize("ckpt", sorted(CKPTS))
def test_token_conditioner_matches_the_decoder(decoders, cache_dir, ckpt):
    from uniar_backend.decoder.conditioning import load_conditioner

    dec = decoders[ckpt]
    cond = load_conditioner(os.path.join(FIXTURES, ckpt), device="cpu", dtype="float32", cache_dir=cache_dir)
    _, _, _, tok = golden_tokens(ckpt, "d1_decode_b1_x2")
    assert cond.fingerprint == dec.fingerprint and cond.channels == dec.transformer.siglip_channels
    assert torch.equal(cond.features(tok), dec.token_features(tok))
    assert torch.equal(cond.features(tok, device="cpu"), dec.token_features(tok))
    emb, ref = cond.prompt(), dec.prompt_embeddings()
    assert torch.equal(emb.prompt_embeds, ref.prompt_embeds) and torch.equal(emb.pooled, ref.pooled)
    other = "uniar-tiny" if ckpt != "uniar-tiny" else "uniar-tiny-bsq64"
    _, _, _, foreign = golden_tokens(other, "d1_decode_b1_x2")
    with pytest.raises(TokenError, match="incompatible"):
        cond.features(foreign)


def test_output_sizes_of_a_token_grid():
    from uniar_backend.decoder.conditioning import check_output_size, output_ratio

    assert output_ratio((64, 64), (96, 96)) == 1.5
    assert output_ratio((64, 96), (96, 144)) == 1.5
    assert output_ratio((64, 64), (64, 96)) is None
    assert output_ratio((64, 64), (160, 160)) is None  # ratio 2.5
    assert check_output_size((64, 96), (128, 192), True, 512) == 2.0
    with pytest.raises(InputError, match="not an output size"):
        check_output_size((64, 64), (64, 96), True, 512)
    with pytest.raises(InputError, match="super_resolution"):
        check_output_size((64, 64), (96, 96), False, 512)
    with pytest.raises(InputError, match="position table"):
        check_output_size((256, 256), (512, 512), True, 256)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_comfyui_formulation_reproduces_the_decode(decoders, guidance):
    """The native route's arithmetic without ComfyUI: k-diffusion Euler over denoised = x - sigma v, CFG on the
    denoised predictions in ComfyUI's batch order [cond, uncond], timestep = sigma x 1000, the DiT's condition made
    per call -- the same final latents as UniAR Decode (float32 rounding apart)."""
    from uniar_backend.decoder.conditioning import reference_noise, reference_sigmas, token_grid

    dec = decoders["uniar-tiny-bsq64"]
    dit = dec.transformer
    _, _, _, tok = golden_tokens("uniar-tiny-bsq64", "d1_decode_b1_x2")
    trace = {}
    dec.decode(tok, steps=4, guidance=guidance, upsampling_ratio=1.5, seed=3, trace=trace)
    feats = dec.token_features(tok)
    emb = dec.prompt_embeddings()
    x = reference_noise((1, 16, 12, 12), 3, torch.float32)
    sig = reference_sigmas(dec.scheduler_config, 4)
    halves = [feats, torch.zeros_like(feats)] if guidance != 1 else [feats]
    with torch.no_grad():
        for i in range(4):
            s = sig[i]
            n = len(halves)
            c = dit.condition(emb.prompt_embeds.expand(n, -1, -1), emb.pooled.expand(n, -1), torch.cat(halves),
                              (6, 6), token_grid(tok))
            v = dit(x.expand(n, -1, -1, -1), timestep=(s * 1000).expand(n), condition=c)[0]
            den = x - v * s
            d = den[1:] + (den[:1] - den[1:]) * guidance if n == 2 else den
            x = x + (x - d) / s * (sig[i + 1] - s)
    z = x / dec.vae.config.scaling_factor + dec.vae.config.shift_factor
    assert maxdiff(z, trace["vae_input"]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_encoder_equals_diffusers_autoencoder(dtype):
    """The encoding half (native route's VAE Encode): AutoencoderKL.encode(x).latent_dist.mode(), exactly."""
    from diffusers import AutoencoderKL

    from uniar_backend.checkpoint import WeightFiles
    from uniar_backend.decoder import components as C

    root = os.path.join(FIXTURES, "uniar-tiny")
    ours = C.load_vae(root, "cpu", dtype, part="encoder")
    assert not any(k.startswith("decoder.") for k in ours.state_dict())
    ref = AutoencoderKL.from_config(C.read_vae_config(root))
    files = WeightFiles(os.path.join(root, C.VAE_DIR), "diffusion_pytorch_model")
    ref.load_state_dict(files.read(files.keys()), strict=True)
    ref = ref.to(dtype).eval()
    x = (torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), ref.encode(x).latent_dist.mode())
