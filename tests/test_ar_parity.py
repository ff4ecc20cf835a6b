"""Parity with the reference goldens on both fixture checkpoints (float32, CPU): tokenisation, text-to-image,
edit, understanding; both samplers; logits-level checks; the bf16 golden's first-step logits."""

import pytest
import torch
from conftest import CKPTS, GEN_CASES, TEST_IMAGE, golden, load_model

from uniar_backend import api
from uniar_backend.bsq import bits_to_indices
from uniar_backend.preprocess import load_image


@pytest.mark.parametrize("name", CKPTS)
def test_a1_tokenize(name):
    ck, m = load_model(name)
    g = golden(name, "a_bsq_tokenize")
    grid = [tuple(g["a1.image_grid_thw"][0].tolist())]
    bits = m.visual.encode_bits(g["a1.pixel_values"], grid)
    assert torch.equal(bits, g["a1.codes_tokens"])
    assert torch.equal(bits_to_indices(bits), g["a1.indices_tokens"])
    for lv in range(4):  # per-level per-patch indices of the quantizer
        per_patch = bits_to_indices(bits[:, lv].reshape(-1, bits.shape[-1]))
        assert torch.equal(per_patch, g[f"a1.indices_level{lv}"])
    main, deep = m.visual.bits_to_features(bits)
    assert (main - g["a1.features_llm_main"]).abs().max() < 1e-5
    assert (main - g["a1.visual_forward_embeds"]).abs().max() < 1e-5
    for k, d in enumerate(deep):
        assert (d - g[f"a1.features_llm_deepstack{k}"]).abs().max() < 1e-5
    # through the public API (image file -> tokens)
    tokens = api.UniAR(ck, m).encode(load_image(TEST_IMAGE))
    assert torch.equal(tokens.indices[0], g["a1.indices_tokens"])
    assert (tokens.ar_height, tokens.ar_width) == (g["a1.image_grid_thw"][0, 1] * 16, g["a1.image_grid_thw"][0, 2] * 16)


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("case", list(GEN_CASES))
@pytest.mark.parametrize("name", CKPTS)
def test_generation_goldens(name, case, mode):
    ck, m = load_model(name)
    g = golden(name, case)
    c = GEN_CASES[case]
    info, logits = {}, []
    edit = [load_image(TEST_IMAGE)] if c["edit"] else None
    tokens = api.UniAR(ck, m).generate([c["prompt"]], c["height"], c["width"], cfg=c["cfg"], temperature=1.0,
                          seed=c["seed"], edit_images=edit, mode=mode, logits_out=logits, info=info)
    assert torch.equal(info["input_ids"], g["prefix_input_ids"])
    assert torch.equal(info["attention_mask"], g["attention_mask"])
    assert torch.equal(info["positions"], g["pos_ids_all"])
    got = torch.stack(logits)
    assert got.shape == g["vistok_head_logits"].shape
    assert (got[0] - g["vistok_head_logits"][0]).abs().max() < 1e-5  # first step: identical inputs
    assert (got - g["vistok_head_logits"]).abs().max() < 1e-4  # every step (same sampled bits)
    assert torch.equal(tokens.indices, g["indices"])
    assert tokens.indices.dtype == torch.int64 and list(tokens.indices.shape) == list(g["indices"].shape)


@pytest.mark.parametrize("name", CKPTS)
def test_cfg1_deviation_conditional_rows_only(name):
    """With cfg <= 1 the reference also generates and returns an empty-prompt row; we return only the prompt's
    row (documented deviation).  Equivalence at the logits level: our first-step logits equal the reference's
    conditional row."""
    ck, m = load_model(name)
    g = golden(name, "b2_t2i_64x64_cfg1.0")
    logits = []
    tokens = api.UniAR(ck, m).generate(["A red cube on a blue table."], 64, 64, cfg=1.0, seed=1234, logits_out=logits)
    assert tokens.batch_size == 1 and g["indices"].shape[0] == 2
    assert logits[0].shape[0] == 1
    assert (logits[0][0] - g["vistok_head_logits"][0, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("name", CKPTS)
def test_e1_understanding(name):
    ck, m = load_model(name)
    g = golden(name, "e1_understand")
    info = {}
    answer = api.UniAR(ck, m).caption("What is in this image?", image=load_image(TEST_IMAGE), max_new_tokens=16, info=info)
    assert torch.equal(info["input_ids"][0], g["input_ids"])
    assert torch.equal(info["positions"][0], g["position_ids"])
    assert info["output_ids"][0] == g["output_ids"][0].tolist()
    assert (info["scores"][0] - g["scores"][0]).abs().max() < 1e-4
    expected = {"uniar-tiny": "st mountains watft be sitting most most most most most most most most most most",
                "uniar-tiny-bsq64": " wasscri wind systemDeDeDeDeDeDeDeDeDeDeDeDe"}[name]
    assert answer == [expected]


@pytest.mark.parametrize("name", CKPTS)
def test_caption_tokens_equals_caption_image(name):
    ck, m = load_model(name)
    img = load_image(TEST_IMAGE)
    tokens = api.UniAR(ck, m).encode(img)
    a = api.UniAR(ck, m).caption("Describe it.", image=img, max_new_tokens=12)
    b = api.UniAR(ck, m).caption("Describe it.", tokens=tokens, max_new_tokens=12)
    assert a == b and a[0]


def test_caption_from_tokens_needs_no_vision_encoder():
    ck, m = load_model("uniar-tiny-bsq64", components=("llm", "lm_head"))
    assert not m.visual.has_encoder
    assert not any(k.startswith("model.visual.blocks") for k in m.state_dict())
    _, full = load_model("uniar-tiny-bsq64")
    tokens = api.UniAR(ck, full).encode(load_image(TEST_IMAGE))
    assert api.UniAR(ck, m).caption("What is in this image?", tokens=tokens, max_new_tokens=16) == \
        [" wasscri wind systemDeDeDeDeDeDeDeDeDeDeDeDe"]


def test_edit_from_generated_tokens_shared_context():
    """Edit from tokens (no re-encoding): identical to feeding the same bits through the encoder path."""
    ck, m = load_model("uniar-tiny-bsq64")
    t2i = api.UniAR(ck, m).generate(["a house"], 64, 96, seed=3)
    a = api.UniAR(ck, m).generate(["make it red"], 64, 64, seed=5, edit_tokens=t2i)
    b = api.UniAR(ck, m).generate(["make it red"], 64, 64, seed=5, edit_tokens=t2i, mode="reference")
    assert torch.equal(a.indices, b.indices)
    # reading tokens back from a file gives the same edit
    assert a.batch_size == 1


def test_batch_and_sampling_options_fast_equals_reference():
    ck, m = load_model("uniar-tiny")
    kw = dict(prompts=["a cat", "", "a much longer prompt with many more words than the first"], height=64,
              width=96, cfg=3.0, temperature=0.7, seed=2**63 + 5)
    a = api.UniAR(ck, m).generate(mode="fast", **kw)
    b = api.UniAR(ck, m).generate(mode="reference", **kw)
    assert a.batch_size == 3 and torch.equal(a.indices, b.indices)
    c = api.UniAR(ck, m).generate(mode="fast", **{**kw, "seed": 1})
    assert not torch.equal(a.indices, c.indices)


def test_empty_prompt_is_an_unconditional_sample():
    ck, m = load_model("uniar-tiny")
    t = api.UniAR(ck, m).generate([""], 32, 32, cfg=1.5, seed=0)
    assert t.indices.shape == (1, 1, 4, 4)


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_bf16_first_step_logits(case):
    """bf16 golden (everything bfloat16 as upstream runs): first-step logits within 2% of the logit range
    (the golden bf16 itself differs from the float32 golden by up to ~3.3% of the range)."""
    ck, m = load_model("uniar-tiny-bsq64", dtype="bfloat16")
    g = golden("uniar-tiny-bsq64-bf16", case)
    c = GEN_CASES[case]
    logits = []
    api.UniAR(ck, m).generate([c["prompt"]], c["height"], c["width"], cfg=c["cfg"], seed=c["seed"],
                 edit_images=[load_image(TEST_IMAGE)] if c["edit"] else None, logits_out=logits)
    ref = g["vistok_head_logits"][0]
    fp32 = golden("uniar-tiny-bsq64", case)["vistok_head_logits"][0]
    err = (logits[0] - ref).abs().max()
    assert err <= 0.02 * ref.abs().max()
    assert err <= (fp32 - ref).abs().max()  # closer to the bf16 golden than the fp32 golden is


def test_bf16_understanding_tokens():
    ck, m = load_model("uniar-tiny-bsq64", dtype="bfloat16")
    g = golden("uniar-tiny-bsq64-bf16", "e1_understand")
    info = {}
    api.UniAR(ck, m).caption("What is in this image?", image=load_image(TEST_IMAGE), max_new_tokens=16, info=info)
    assert info["output_ids"][0] == g["output_ids"][0].tolist()
