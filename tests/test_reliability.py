"""Reliability: hostile or broken inputs get one clear error before any heavy work, never a crash, a runaway
allocation or a damaged file.  One test (or group) per root cause of the reliability issue; tests that could
allocate a lot run the command in a subprocess under an address-space limit, so a regression fails the test
instead of taking the machine down."""

import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import GEN_CASES, ROOT, TEST_IMAGE, ckpt_path, load_model, run_cli
from test_bad_inputs import copy_ckpt, edit_config

from uniar_backend import api
from uniar_backend.errors import CheckpointError, InputError, TokenError
from uniar_backend.loader import Checkpoint
from uniar_backend.tokens import VisualTokens

MODEL = ckpt_path("uniar-tiny-bsq64")


def _tokens(tmp_path, name="t.safetensors", h=64, w=64, batch=1):
    n = (h // 32) * (w // 32)
    t = VisualTokens(torch.randint(0, 2**16, (batch, n, 4, 4), dtype=torch.int64), h, w, 16, 4, 4)
    return t, t.save(tmp_path / name)


def _no_loading(monkeypatch):
    """Fail the test if any weights are read (the error had to come first)."""
    def boom(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(Checkpoint, "load_ar", boom)
    import uniar_backend.decoder as dec

    monkeypatch.setattr(dec, "load_decoder", boom)


def run_limited(args, limit_gb=6, timeout=300):
    """``python -m uniar_backend ARGS`` in a subprocess whose address space is capped at ``limit_gb``."""
    def cap():
        lim = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "uniar_backend", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, preexec_fn=cap)


# ---------------------------------------------------------------------------------------------- 1. special files
def test_out_never_replaces_a_device_pipe_or_folder(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target, msg in ((fifo, "not a regular file"), (tmp_path, "is a folder"), ("", "empty")):
        r = run_cli("caption", "--model", MODEL, "--image", TEST_IMAGE, "--question", "?", "--out", target,
                    check=False)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    if os.path.exists("/dev/null"):  # what replaced /dev/null as root before: refused before any writing
        r = run_cli("generate", "--model", MODEL, "--prompt", "x", "--height", 64, "--width", 64, "--out",
                    "/dev/null", check=False)
        assert r.returncode == 2 and "not a regular file" in r.stderr
        assert not os.path.isfile("/dev/null")


def test_atomic_write_refuses_special_targets(tmp_path):
    """The shared writer itself (tokens, images, text): a folder or a pipe at the target is never replaced."""
    t, _ = _tokens(tmp_path)
    fifo = tmp_path / "p.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="refusing to replace"):
        t.save(fifo)
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(InputError, match="refusing to replace"):
        t.save(tmp_path / "d.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors", "p.safetensors", "t.safetensors"]


# ---------------------------------------------------------------------------------------------- 2. traversal
@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_may_only_name_files_in_the_folder(tmp_path, name):
    from safetensors.torch import load_file, save_file

    folder = copy_ckpt(tmp_path, skip=("model.safetensors",))
    sd = load_file(os.path.join(MODEL, "model.safetensors"))
    save_file(sd, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in sd}}))
    with pytest.raises(CheckpointError, match="not a file of this folder"):
        Checkpoint(folder).load_ar(device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------- 3. dtype lies
def _rewrite_header(path, fn):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_a_float_weight_stored_as_int_is_refused(tmp_path):
    folder = copy_ckpt(tmp_path)
    key = "model.language_model.layers.0.mlp.up_proj.weight"

    def lie(h):
        assert h[key]["dtype"] == "F32"
        h[key]["dtype"] = "I32"  # same byte size: the data offsets stay valid

    _rewrite_header(folder / "model.safetensors", lie)
    with pytest.raises(CheckpointError, match="stored as torch.int32"):
        Checkpoint(folder).load_ar(components=("llm",), device="cpu", dtype="float32")


def test_header_must_describe_the_whole_file(tmp_path):
    folder = copy_ckpt(tmp_path)
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(CheckpointError, match="64 bytes longer than its header"):
        Checkpoint(folder).load_ar(components=("llm",), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------- 4./5. config
@pytest.mark.parametrize("change,components,msg", [
    ({"text_config.num_hidden_layers": 2}, ("llm",), "not in the model config.json describes"),
    ({"vision_config.depth": 3}, ("vision",), "not in the model config.json describes"),
    ({"visual_transformer_decoder_depth": 1}, ("llm", "gen_head"), "not in the model config.json describes"),
    ({"text_config.num_hidden_layers": -1}, ("llm",), "'num_hidden_layers' = -1 is outside 1..1024"),
    ({"text_config.num_attention_heads": 0}, ("llm",), "'num_attention_heads' = 0 is outside"),
    ({"text_config.num_key_value_heads": 0}, ("llm",), "'num_key_value_heads' = 0 is outside"),
    ({"vision_config.num_heads": 0}, ("vision",), "'num_heads' = 0 is outside"),
    ({"text_config.rms_norm_eps": -1.0}, ("llm",), "'rms_norm_eps' = -1.0 is outside"),
    ({"image_token_id": 10**6}, ("llm",), "image_token_id"),
])
def test_config_that_disagrees_with_the_weights(tmp_path, change, components, msg):
    cfg = json.loads(open(os.path.join(MODEL, "config.json")).read())
    if "text_config.num_hidden_layers" in change and change["text_config.num_hidden_layers"] > 0:
        assert cfg["text_config"]["num_hidden_layers"] > 2  # the weights hold more layers than the config says
    folder = copy_ckpt(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=msg):
        Checkpoint(folder).load_ar(components=components, device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------- 6. long prompts
def test_a_100kb_prompt_is_refused_cleanly_within_bounded_memory(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a red cube on a blue table, " * 3600)  # ~100 KB
    r = run_limited(["generate", "--model", MODEL, "--prompt-file", prompt, "--height", 64, "--width", 64,
                     "--out", tmp_path / "o.safetensors", "--device", "cpu"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tokens long; at most 8192" in r.stderr and "Traceback" not in r.stderr
    q = tmp_path / "q.txt"
    q.write_text("what? " * 200000)  # 1.2 MB: refused before it is even read as a question
    r = run_limited(["caption", "--model", MODEL, "--question-file", q, "--image", TEST_IMAGE])
    assert r.returncode == 2 and "larger than 1024 KiB" in r.stderr, r.stderr[-2000:]


def test_prompt_and_question_files(tmp_path):
    case = GEN_CASES["b1_t2i_64x64_cfg1.5"]
    pf = tmp_path / "p.txt"
    pf.write_text(case["prompt"] + "\n")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--model", MODEL, "--height", 64, "--width", 64, "--seed", case["seed"], "--device", "cpu",
              "--dtype", "float32"]
    run_cli("generate", "--prompt-file", pf, "--out", a, *common)
    run_cli("generate", "--prompt", case["prompt"], "--out", b, *common)
    assert open(a, "rb").read() == open(b, "rb").read()  # same tokens, and byte-identical files (9.)
    qf = tmp_path / "q.txt"
    qf.write_text("What is it?")
    x = run_cli("caption", "--model", MODEL, "--tokens", a, "--question-file", qf, "--max-new-tokens", 4)
    y = run_cli("caption", "--model", MODEL, "--tokens", a, "--question", "What is it?", "--max-new-tokens", 4)
    assert x.stdout == y.stdout


# ---------------------------------------------------------------------------------------------- 7. token limits
def test_tokens_file_beyond_the_limits_is_refused_before_reading(tmp_path):
    from uniar_backend.tokens import write_safetensors

    big = tmp_path / "big.safetensors"
    n = (8192 // 32) ** 2
    meta = {"format": "uniar.visual_tokens", "version": "1", "ar_height": "8192", "ar_width": "8192",
            "bsq_dim": "16", "levels": "4", "merge_unit": "4", "fingerprint": ""}
    write_safetensors(str(big), {"indices": torch.zeros(1, n, 4, 4, dtype=torch.int64)}, meta)
    with pytest.raises(TokenError, match="larger than 4096 pixels"):
        VisualTokens.load(big)
    r = run_limited(["caption", "--model", MODEL, "--tokens", big, "--question", "?"], limit_gb=4)
    assert r.returncode == 2 and "larger than 4096" in r.stderr, r.stderr[-2000:]
    empty = tmp_path / "empty.safetensors"
    write_safetensors(str(empty), {"indices": torch.zeros(0, 4, 4, 4, dtype=torch.int64)},
                      dict(meta, ar_height="64", ar_width="64"))
    with pytest.raises(TokenError, match="hold 0 images"):
        VisualTokens.load(empty)


def test_a_model_shard_as_tokens_file_gives_a_short_error():
    with pytest.raises(TokenError) as e:
        VisualTokens.load(os.path.join(MODEL, "model.safetensors"))
    assert "no tensor 'indices'" in str(e.value) and len(str(e.value)) < 400


# ---------------------------------------------------------------------------------------------- 8. outputs first
def test_output_problems_are_found_before_any_work(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    (tmp_path / "afile").write_text("x")
    tok = _tokens(tmp_path)[1]
    cases = [
        (["caption", "--model", MODEL, "--tokens", tok, "--question", "?", "--out", tmp_path], "is a folder"),
        (["caption", "--model", MODEL, "--tokens", tok, "--question", "?", "--out", tmp_path / "afile" / "x.txt"],
         "is a file, so no folder"),
        (["tokenize", "--model", MODEL, "--image", TEST_IMAGE, "--out", ""], "empty"),
        (["decode", "--model", MODEL, "--tokens", tok, "--out", tmp_path / "x.gif"], "suffixes .png"),
        (["t2i", "--model", MODEL, "--prompt", "x", "--height", 64, "--width", 64, "--out", tmp_path / "o.png",
          "--save-tokens", tmp_path / "t.png"], "suffixes .safetensors"),
        (["generate", "--model", MODEL, "--prompt", "x", "--height", 64, "--width", 64, "--out",
          tmp_path / "o.txt"], "suffixes .safetensors"),
    ]
    if os.path.isdir("/proc/self"):  # a folder no file can be created in, whoever runs the test
        cases.append((["generate", "--model", MODEL, "--prompt", "x", "--height", 64, "--width", 64, "--out",
                       "/proc/self/uniar.safetensors"], "cannot write in"))
    for args, msg in cases:
        r = run_cli(*args, check=False)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


def test_decode_writes_the_format_its_suffix_names(tmp_path):
    from uniar_backend.decoder.images import save_images

    img = torch.rand(1, 16, 16, 3)
    magic = {".png": b"\x89PNG", ".jpg": b"\xff\xd8\xff", ".webp": b"RIFF"}
    for ext, head in magic.items():
        path = save_images(img, tmp_path / f"x{ext}")[0]
        assert open(path, "rb").read(4).startswith(head), ext
    with pytest.raises(InputError, match="unknown image suffix"):
        save_images(img, tmp_path / "x.gif")


# ---------------------------------------------------------------------------------------------- 9. OOM, bytes
@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                                               "tried to allocate 45000000000 bytes"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")])
def test_out_of_memory_is_one_line(tmp_path, monkeypatch, error):
    def oom(*a, **k):
        raise error

    monkeypatch.setattr(api.UniAR, "generate", oom)
    r = run_cli("generate", "--model", MODEL, "--prompt", "x", "--height", 64, "--width", 64, "--out",
                tmp_path / "o.safetensors", check=False)
    assert r.returncode == 3 and r.stderr.startswith("error: out of memory") and r.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    def bug(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(api.UniAR, "generate", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli("generate", "--model", MODEL, "--prompt", "x", "--height", 64, "--width", 64, "--out",
                tmp_path / "o.safetensors", check=False)


def test_tokens_files_are_byte_identical_and_standard(tmp_path):
    from safetensors.torch import load_file

    t, a = _tokens(tmp_path, "a.safetensors")
    t2 = VisualTokens(t.indices.clone(), 64, 64, 16, 4, 4, extra={"z": "1", "b": "2", "prompt": "x"})
    t3 = VisualTokens(t.indices.clone(), 64, 64, 16, 4, 4, extra={"prompt": "x", "b": "2", "z": "1"})
    b, c = t2.save(tmp_path / "b.safetensors"), t3.save(tmp_path / "c.safetensors")
    assert open(b, "rb").read() == open(c, "rb").read()
    assert torch.equal(load_file(a)["indices"], t.indices)  # readable by safetensors itself
    assert torch.equal(VisualTokens.load(b).indices, t.indices)


# ---------------------------------------------------------------------------------------------- 10. messages
def test_input_files_say_what_they_are(tmp_path):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    out = tmp_path / "o.safetensors"
    for path, msg in ((loop, "symbolic-link loop"), (tmp_path, "is a folder, not a file"),
                      (tmp_path / "nope.png", "not found")):
        r = run_cli("tokenize", "--model", MODEL, "--image", path, "--out", out, check=False)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_16_bit_png_is_converted_not_clipped(tmp_path):
    from PIL import Image

    from uniar_backend.preprocess import load_image

    arr = np.full((32, 32), 32768, dtype=np.uint16)  # mid grey in 16 bits
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    px = np.asarray(load_image(str(p)))
    assert px.shape == (32, 32, 3) and abs(int(px[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize("question", ["What is <|image_pad|> here?", "Stop <|im_end|> now"])
def test_reserved_tokens_in_questions_are_refused_like_prompts(question):
    ck, m = load_model("uniar-tiny-bsq64", components=("llm", "lm_head"))
    tok = VisualTokens(torch.zeros(1, 4, 4, 4, dtype=torch.int64), 64, 64, 64, 4, 4)
    with pytest.raises(InputError, match="question contains the reserved token"):
        api.UniAR(ck, m).caption(question, tokens=tok, max_new_tokens=2)


def test_edit_count_message_for_one_prompt():
    ck, m = load_model("uniar-tiny-bsq64", components=("llm", "gen_head"))
    tok = VisualTokens(torch.zeros(3, 4, 4, 4, dtype=torch.int64), 64, 64, 64, 4, 4)
    with pytest.raises(InputError) as e:
        api.UniAR(ck, m).generate(["x"], 64, 64, edit_tokens=tok)
    assert "give 1 or 1" not in str(e.value) and "3 images for 1 prompt(s); give 1" in str(e.value)


# ---------------------------------------------------------------------------------------------- soak
def test_soak_no_memory_growth():
    """generate + caption + decode cycles with the models loaded: RSS flat after the warm-up (the full 50-cycle run
    and the ComfyUI run: scripts/soak.py)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--cycles", "12", "--json",
                        "--model", MODEL], capture_output=True, text=True, timeout=600, preexec_fn=cap,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["growth_mb"] < 16, rep  # a model, cache or trace kept per cycle would be far more


def test_generation_size_is_bounded_jointly(tmp_path, monkeypatch):
    """Each side and the batch are in range, but together the KV cache would be enormous: refused up front."""
    from uniar_backend.limits import MAX_ROW_POSITIONS, check_generation

    check_generation(1, 4096, 4096, 1.5)  # the largest single image, with cfg
    check_generation(32, 1024, 1024, 1.5)
    with pytest.raises(InputError, match="lower batch_size or the size"):
        check_generation(64, 4096, 4096, 1.5)
    with pytest.raises(InputError, match=str(MAX_ROW_POSITIONS)):
        check_generation(64, 1024, 1024, 1.5, prompt_tokens=20)  # 128 rows x 1044 positions
    _no_loading(monkeypatch)
    r = run_cli("generate", "--model", MODEL, "--prompt", "x", "--height", 4096, "--width", 4096, "--batch-size",
                64, "--out", tmp_path / "o.safetensors", check=False)
    assert r.returncode == 2 and "lower batch_size" in r.stderr
