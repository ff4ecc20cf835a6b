"""Bad inputs get a clear error naming the problem and the fix, before any heavy work (README's table)."""

import json
import os
import shutil

import pytest
import torch
from conftest import TEST_IMAGE, ckpt_path, load_model, run_cli

from uniar_backend import api
from uniar_backend.errors import CheckpointError, InputError, TokenError
from uniar_backend.loader import Checkpoint
from uniar_backend.preprocess import load_image


def copy_ckpt(tmp_path, name="uniar-tiny-bsq64", skip=()):
    """A writable copy of a fixture checkpoint's AR files (decoder folders left out unless needed)."""
    src = ckpt_path(name)
    dst = tmp_path / name
    dst.mkdir()
    for fn in os.listdir(src):
        if fn in skip or os.path.isdir(os.path.join(src, fn)):
            continue
        shutil.copy(os.path.join(src, fn), dst / fn)
    return dst


def edit_config(folder, **changes):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        target = cfg
        *path, last = k.split(".")
        for part in path:
            target = target[part]
        target[last] = v
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("h,w,msg", [(100, 64, "multiple of 32"), (64, 0, "multiple of 32"), (8192, 64, "too large"),
                                     (64.0, 64, "integer")])
def test_bad_sizes(h, w, msg):
    ck, m = load_model("uniar-tiny")
    with pytest.raises(InputError, match=msg):
        api.UniAR(ck, m).generate(["x"], h, w)


@pytest.mark.parametrize("kw,msg", [(dict(cfg=-1), "cfg"), (dict(cfg=float("nan")), "cfg"),
                                    (dict(temperature=0), "temperature"), (dict(seed=-1), "seed"),
                                    (dict(mode="turbo"), "mode"), (dict(seed=2**64), "seed")])
def test_bad_sampling_values(kw, msg):
    ck, m = load_model("uniar-tiny")
    with pytest.raises(InputError, match=msg):
        api.UniAR(ck, m).generate(["x"], 64, 64, **kw)


def test_prompt_longer_than_context(tmp_path):
    folder = copy_ckpt(tmp_path)
    edit_config(folder, **{"text_config.max_position_embeddings": 64})
    ck = Checkpoint(folder)
    m = ck.load_ar(components=("llm", "gen_head"), device="cpu", dtype="float32")
    with pytest.raises(InputError, match="exceed the model's context of 64 tokens"):
        api.UniAR(ck, m).generate(["word " * 80], 64, 64)


def test_reserved_tokens_in_prompt():
    ck, m = load_model("uniar-tiny")
    with pytest.raises(InputError, match="reserved token"):
        api.UniAR(ck, m).generate(["a <|image_pad|> b"], 64, 64)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(CheckpointError, match="model_type is 'qwen3_vl', expected 'uniar'"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(tmp_path)


def test_missing_weights(tmp_path):
    folder = copy_ckpt(tmp_path, skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(folder).load_ar(device="cpu")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        Checkpoint(folder).load_ar(device="cpu")


def test_missing_shard(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_ckpt(tmp_path, skip=("model.safetensors",))
    sd = load_file(ckpt_path("uniar-tiny-bsq64") + "/model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:half]}, str(folder / names[0]), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing shard file\\(s\\) model-00002-of-00002.safetensors"):
        Checkpoint(folder).load_ar(device="cpu")


def test_truncated_safetensors(tmp_path):
    folder = copy_ckpt(tmp_path, skip=("model.safetensors",))
    data = open(ckpt_path("uniar-tiny-bsq64") + "/model.safetensors", "rb").read()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated download"):
        Checkpoint(folder).load_ar(device="cpu")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a valid .safetensors file"):
        Checkpoint(folder).load_ar(device="cpu")


def test_shape_mismatch(tmp_path):
    folder = copy_ckpt(tmp_path)
    edit_config(folder, **{"text_config.intermediate_size": 96})
    with pytest.raises(CheckpointError, match="has shape .* config.json implies"):
        Checkpoint(folder).load_ar(device="cpu")


def test_head_variant_mismatch(tmp_path):
    folder = copy_ckpt(tmp_path)
    edit_config(folder, vistok_pred_layernorm=False)
    with pytest.raises(CheckpointError, match="'linear' vistok head but the weights hold a 'layernorm' head"):
        Checkpoint(folder).load_ar(device="cpu")


def test_missing_tokenizer(tmp_path):
    folder = copy_ckpt(tmp_path, skip=("tokenizer.json",))
    ck = Checkpoint(folder)
    m = ck.load_ar(components=("llm", "gen_head"), device="cpu")
    with pytest.raises(CheckpointError, match="tokenizer"):
        api.UniAR(ck, m).generate(["x"], 32, 32)


def test_tokens_of_another_model():
    ck16, m16 = load_model("uniar-tiny")
    ck64, m64 = load_model("uniar-tiny-bsq64")
    t64 = api.UniAR(ck64, m64).generate(["x"], 32, 32)
    with pytest.raises(TokenError, match="incompatible model"):
        api.UniAR(ck16, m16).caption("what?", tokens=t64, max_new_tokens=2)
    with pytest.raises(TokenError, match="incompatible model"):
        api.UniAR(ck16, m16).generate(["edit"], 32, 32, edit_tokens=t64)


def test_unreadable_image_cli(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"GIF89a broken")
    p = run_cli("caption", "--model", ckpt_path("uniar-tiny"), "--image", bad, "--question", "q", check=False,
                subprocess_=True)
    assert p.returncode != 0 and "cannot read image" in p.stderr and "Traceback" not in p.stderr


def test_bad_runtime_options():
    ck = Checkpoint(ckpt_path("uniar-tiny"))
    with pytest.raises(InputError, match="dtype"):
        ck.load_ar(device="cpu", dtype="float8")
    with pytest.raises(InputError, match="attention"):
        ck.load_ar(device="cpu", attention="xformers")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            ck.load_ar(device="cuda")
        with pytest.raises(InputError, match="flash_attention_2 needs CUDA"):
            ck.load_ar(device="cpu", attention="flash_attention_2")


def test_caption_bad_values():
    ck, m = load_model("uniar-tiny")
    img = load_image(TEST_IMAGE)
    with pytest.raises(InputError, match="either an image or visual tokens"):
        api.UniAR(ck, m).caption("q")
    with pytest.raises(InputError, match="max_new_tokens"):
        api.UniAR(ck, m).caption("q", image=img, max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        api.UniAR(ck, m).caption("q", image=img, do_sample=True, top_p=0)


def test_missing_component():
    ck, m = load_model("uniar-tiny", components=("llm", "lm_head"))
    with pytest.raises(InputError, match="gen_head"):
        api.UniAR(ck, m).generate(["x"], 32, 32)
    with pytest.raises(InputError, match="vision"):
        api.UniAR(ck, m).encode(load_image(TEST_IMAGE))


# ---------------------------------------------------------------------------------------------- untrusted JSON
DEEP = "[" * 100_000  # deep enough to exhaust the JSON parser's recursion


def _safetensors_with_header(path, header: bytes):
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_every_json_of_a_file_is_bounded_and_fails_cleanly(tmp_path):
    """config.json, the shard index, chat_template.json, a safetensors header (a tokens file from ComfyUI's
    input/), nested 100,000 deep, of the wrong type or oversized: one UniARError naming the file, never a raw
    RecursionError / TypeError / AttributeError."""
    from uniar_backend.errors import UniARError
    from uniar_backend.jsonfile import MAX_JSON_FILE
    from uniar_backend.tokens import VisualTokens

    d = copy_ckpt(tmp_path)
    cfg = (d / "config.json").read_text()
    for bad, what in ((DEEP, "nested too deeply"), ("[1, 2]", "expected a JSON object"),
                      (" " * (MAX_JSON_FILE + 1) + "{}", "more than"), (b"\xff\xfe{", "not valid JSON")):
        (d / "config.json").write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(CheckpointError, match=what) as e:
            Checkpoint(d)
        assert "config.json" in str(e.value)
    (d / "config.json").write_text(cfg)

    index = d / "model.safetensors.index.json"
    for bad, what in ((DEEP, "nested too deeply"), ("[1, 2]", "expected a JSON object"),
                      ('{"weight_map": ["a"]}', "weight_map must map"), ('{"weight_map": {"a": 1}}', "weight_map")):
        index.write_text(bad)
        with pytest.raises(CheckpointError, match=what):
            Checkpoint(d).weights
    index.unlink()

    from uniar_backend.prompting import _chat_template

    (d / "chat_template.jinja").unlink(missing_ok=True)
    (d / "chat_template.json").write_text(DEEP)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        _chat_template(Checkpoint(d))
    (d / "chat_template.json").write_text('{"chat_template": ["x"]}')
    with pytest.raises(CheckpointError, match="chat_template"):
        _chat_template(Checkpoint(d))

    tok = tmp_path / "deep.safetensors"
    _safetensors_with_header(tok, DEEP.encode())
    with pytest.raises(TokenError, match="nested too deeply"):
        VisualTokens.load(tok)
    _safetensors_with_header(tok, b'{"__metadata__": {"format": "uniar.visual_tokens", "version": "1", '
                                  b'"ar_height": [1]}, "indices": {"dtype": "I64", "shape": [0], '
                                  b'"data_offsets": [0, 0]}}')
    with pytest.raises(UniARError):
        VisualTokens.load(tok)
    shard = d / "model.safetensors"
    _safetensors_with_header(shard, b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(CheckpointError, match="not a valid .safetensors file.*nested too deeply"):
        Checkpoint(d).weights


def test_missing_checkpoint_folder_says_how_to_get_it(tmp_path):
    """README command 2 on a fresh machine: the error names the download command and its size, in one line."""
    for name, repo in (("UniAR-SFT", "ShareLab-SII/UniAR-SFT"), ("UniAR-RL", "ShareLab-SII/UniAR-RL")):
        r = run_cli("t2i", "--model", tmp_path / "models" / "uniar" / name, "--prompt", "a fox", "--height", "512",
                    "--width", "512", "--out", tmp_path / "fox.png", check=False)
        assert r.returncode == 2
        line = r.stderr.strip()
        assert "\n" not in line and "checkpoint folder not found" in line
        assert f"python -m uniar_backend download --repo {repo} --out {tmp_path / 'models' / 'uniar' / name}" in line
        assert "26 GB" in line
