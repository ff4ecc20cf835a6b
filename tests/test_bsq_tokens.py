"""BSQ index <-> bit codec (64-bit quirk) and the visual-token file format."""

import os

import pytest
import torch
from conftest import CKPTS, golden

from uniar_backend import bsq
from uniar_backend.errors import TokenError
from uniar_backend.tokens import VisualTokens


@pytest.mark.parametrize("name,d", [("uniar-tiny", 16), ("uniar-tiny-bsq64", 64)])
def test_codec_matches_reference(name, d):
    g = golden(name, "q_bsq_index_codec")
    assert torch.equal(bsq.basis(d), g["basis"])
    assert torch.equal(bsq.indices_to_bits(g["indices"], d), g["codes_01"])
    assert torch.equal(bsq.bits_to_indices(g["codes_01"]), g["codes_to_indexes_of_codes"])
    assert torch.equal(bsq.indices_to_bits(g["indices"], d, exact=True), g["naive_msb_first_bits"])


def test_64bit_quirk_swaps_only_two_indices():
    idx = torch.tensor([0, -(2**63), 1, -1, 2**62, -(2**62), 12345], dtype=torch.int64)
    quirk = bsq.indices_to_bits(idx, 64)
    exact = bsq.indices_to_bits(idx, 64, exact=True)
    differs = (quirk != exact).any(-1)
    assert differs.tolist() == [True, True, False, False, False, False, False]
    assert quirk[0, 0] == 1 and quirk[1, 0] == 0  # 0 decodes with its top bit set, -2**63 without
    assert torch.equal(bsq.bits_to_indices(exact), idx)  # MSB-first two's complement round trip


def _tokens(d=64, h=64, w=96, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (b, (h // 32) * (w // 32), 4, 4, d), generator=g)
    return VisualTokens.from_bits(bits, h, w, fingerprint="abc123")


def test_save_load_roundtrip(tmp_path):
    t = _tokens()
    path = t.save(tmp_path / "t.safetensors")
    u = VisualTokens.load(path)
    assert torch.equal(u.indices, t.indices)
    assert (u.ar_height, u.ar_width, u.bsq_dim, u.levels, u.merge_unit, u.fingerprint) == (64, 96, 64, 4, 4, "abc123")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["indices"]
    assert meta["format"] == "uniar.visual_tokens" and meta["version"] == "1"
    assert {k: meta[k] for k in ("ar_height", "ar_width", "bsq_dim", "levels", "merge_unit")} == {
        "ar_height": "64", "ar_width": "96", "bsq_dim": "64", "levels": "4", "merge_unit": "4"}
    assert [p for p in os.listdir(tmp_path) if p.startswith(".uniar")] == []


def test_golden_indices_are_valid_tokens():
    for name in CKPTS:
        g = golden(name, "b3_t2i_96x128_cfg1.5")
        d = 16 if name == "uniar-tiny" else 64
        t = VisualTokens(g["indices"], 96, 128, d, 4, 4)
        assert torch.equal(t.bits(), bsq.indices_to_bits(g["indices"], d))
        assert torch.equal(t.bits()[0], g["raw_codes"][0]) or d == 64  # d=64: quirk may flip two indices


def test_save_failure_leaves_no_file(tmp_path, monkeypatch):
    from uniar_backend import tokens as tokens_module

    def boom(path, *a, **k):
        with open(path, "wb") as f:  # half a file, then the disk is full
            f.write(b"12345")
        raise OSError("disk full")

    monkeypatch.setattr(tokens_module, "write_safetensors", boom)
    with pytest.raises(OSError):
        _tokens().save(tmp_path / "t.safetensors")
    assert os.listdir(tmp_path) == []


def test_incompatible_tokens_refused():
    t = _tokens(d=16)
    with pytest.raises(TokenError, match="incompatible model"):
        t.check_compatible(64, 4, 4)
    assert t.check_compatible(16, 4, 4, "other") != []  # another fingerprint: warning only


@pytest.mark.parametrize("kind", ["missing", "garbage", "wrong_format", "bad_shape", "out_of_range"])
def test_bad_token_files(tmp_path, kind):
    from safetensors.torch import save_file

    p = tmp_path / "t.safetensors"
    if kind == "garbage":
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif kind == "wrong_format":
        save_file({"indices": torch.zeros(1, 4, 4, 4, dtype=torch.int64)}, str(p), metadata={"format": "other"})
    elif kind == "bad_shape":
        t = _tokens()
        meta = t.metadata()
        save_file({"indices": torch.zeros(1, 5, 4, 4, dtype=torch.int64)}, str(p), metadata=meta)
    elif kind == "out_of_range":
        meta = _tokens(d=16).metadata()
        save_file({"indices": torch.full((2, 6, 4, 4), 2**20, dtype=torch.int64)}, str(p), metadata=meta)
    with pytest.raises(TokenError):
        VisualTokens.load(p)


def test_sizes_must_be_multiples_of_32():
    with pytest.raises(TokenError, match="multiple of 32"):
        VisualTokens(torch.zeros(1, 4, 4, 4, dtype=torch.int64), 60, 64, 64, 4, 4)
