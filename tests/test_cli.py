"""The CLI reproduces the goldens and reports errors as one line with a non-zero exit."""

import pytest
import torch
from conftest import GEN_CASES, GOLDEN, TEST_IMAGE, ckpt_path, golden, run_cli

from uniar_backend.tokens import VisualTokens

COMMON = ("--device", "cpu", "--dtype", "float32")


@pytest.mark.parametrize("name", ["uniar-tiny", "uniar-tiny-bsq64"])
def test_cli_generate_edit_tokenize_caption(tmp_path, name):
    model = ckpt_path(name)
    for case, c in GEN_CASES.items():
        out = tmp_path / f"{case}.safetensors"
        args = ["generate", "--model", model, "--prompt", c["prompt"], "--height", c["height"], "--width", c["width"],
                "--cfg", c["cfg"], "--seed", c["seed"], "--out", out, *COMMON]
        if c["edit"]:
            args += ["--image", TEST_IMAGE]
        run_cli(*args)
        assert torch.equal(VisualTokens.load(out).indices, golden(name, case)["indices"]), case

    tok = tmp_path / "a.safetensors"
    run_cli("tokenize", "--model", model, "--image", TEST_IMAGE, "--out", tok, *COMMON)
    assert torch.equal(VisualTokens.load(tok).indices[0], golden(name, "a_bsq_tokenize")["a1.indices_tokens"])

    txt = tmp_path / "answer.txt"
    p1 = run_cli("caption", "--model", model, "--image", TEST_IMAGE, "--question", "What is in this image?",
                 "--max-new-tokens", 16, "--out", txt, *COMMON)
    p2 = run_cli("caption", "--model", model, "--tokens", tok, "--question", "What is in this image?",
                 "--max-new-tokens", 16, *COMMON)
    import json

    manifest = json.load(open(f"{GOLDEN}/{name}/manifest.json"))
    expected = manifest["steps"]["e1_understand"]["output_text"] if "steps" in manifest else None
    assert p1.stdout == p2.stdout
    assert txt.read_text(encoding="utf-8") == p1.stdout.rstrip("\n")
    if expected is not None:
        assert p1.stdout.rstrip("\n") == expected


def test_cli_generate_with_image_tokens(tmp_path):
    model = ckpt_path("uniar-tiny-bsq64")
    t2i = tmp_path / "t2i.safetensors"
    run_cli("generate", "--model", model, "--prompt", "a boat", "--height", 64, "--width", 64, "--out", t2i, *COMMON)
    e1, e2 = tmp_path / "e1.safetensors", tmp_path / "e2.safetensors"
    run_cli("generate", "--model", model, "--prompt", "at night", "--height", 64, "--width", 64, "--image-tokens", t2i,
            "--seed", 9, "--out", e1, *COMMON)
    run_cli("generate", "--model", model, "--prompt", "at night", "--height", 64, "--width", 64, "--image-tokens", t2i,
            "--seed", 9, "--mode", "reference", "--out", e2, *COMMON)
    assert torch.equal(VisualTokens.load(e1).indices, VisualTokens.load(e2).indices)


def test_cli_batch(tmp_path):
    out = tmp_path / "b.safetensors"
    run_cli("generate", "--model", ckpt_path("uniar-tiny"), "--prompt", "x", "--height", 32, "--width", 64,
            "--batch-size", 2, "--out", out, *COMMON, subprocess_=True)  # the real `python -m` entry point
    t = VisualTokens.load(out)
    assert t.indices.shape == (2, 2, 4, 4)
    assert not torch.equal(t.indices[0], t.indices[1])  # every row draws its own bits


def test_cli_error_is_one_line(tmp_path):
    p = run_cli("generate", "--model", ckpt_path("uniar-tiny"), "--prompt", "x", "--height", 100, "--width", 64,
                "--out", tmp_path / "o.safetensors", check=False, subprocess_=True)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "multiple of 32" in lines[0], p.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_progress_bar_on_a_terminal_only(tmp_path):
    """On a terminal (a pseudo-terminal here) the CLI draws tqdm bars with rate and ETA for the AR steps and the
    conversion's bytes; piped, it prints no bar."""
    from conftest import run_cli_stderr as run

    gen = ["generate", "--model", ckpt_path("uniar-tiny"), "--prompt", "a", "--height", "64", "--width", "64",
           "--device", "cpu", "--out", str(tmp_path / "t.safetensors")]
    rc, err = run(gen, tty=True)
    assert rc == 0, err
    assert "generate: 100%" in err and "4/4" in err and ("token/s" in err or "s/token" in err), err
    rc, err = run(["quantize", "--model", ckpt_path("uniar-tiny"), "--format", "int8", "--out",
                   str(tmp_path / "q")], tty=True)
    assert rc == 0, err
    assert "quantize: 100%" in err and "B/s" in err, err
    rc, err = run(gen, tty=False)
    assert rc == 0 and "generate:" not in err and "%" not in err
