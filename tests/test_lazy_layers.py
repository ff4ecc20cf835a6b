"""Layer classes that create their weights lazily (ComfyUI's dynamic VRAM) load every weight, without ComfyUI.

Under dynamic VRAM (comfy-aimdo: the default on NVIDIA since ComfyUI 0.38, on Windows since 0.28),
``comfy.ops.disable_weight_init.Linear.__init__`` leaves ``weight = None`` and takes the tensor in
``_load_from_state_dict``; ``Embedding`` keeps a meta weight until then.  A loader that lists the keys to read from
``module.state_dict()`` never reads those weights.  ``LazyOps`` below follows that protocol (the same observable
behaviour as ``comfy/ops.py`` of 0.28 / 0.38: no weight before loading, the tensor assigned in
``_load_from_state_dict``, a missing key reported); the live test in tests/test_comfyui_live.py runs the real
ComfyUI classes with dynamic VRAM switched on.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import TEST_IMAGE, ckpt_path, load_model

from uniar_backend import api
from uniar_backend.errors import CheckpointError
from uniar_backend.loader import Checkpoint
from uniar_backend.preprocess import load_image


def _lazy_load(module, state_dict, prefix, local_metadata, missing_keys, unexpected_keys, weight_shape, has_bias):
    assign = local_metadata.get("assign_to_params_buffers", False)
    for k, v in state_dict.items():
        key = k[len(prefix):]
        if key == "weight":
            module.weight = torch.nn.Parameter(v if assign else v.clone(), requires_grad=False)
        elif key == "bias" and has_bias:
            module.bias = torch.nn.Parameter(v if assign else v.clone(), requires_grad=False)
        else:
            unexpected_keys.append(k)
    if module.weight is None or module.weight.is_meta:
        module.weight = torch.nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        missing_keys.append(prefix + "weight")


class LazyLinear(torch.nn.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = None
        self.bias = None
        self._has_bias = bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        _lazy_load(self, state_dict, prefix, local_metadata, missing_keys, unexpected_keys,
                   (self.out_features, self.in_features), self._has_bias)


class LazyEmbedding(torch.nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, *args, device=None, dtype=None, **kw):
        torch.nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.weight = torch.nn.Parameter(torch.empty((num_embeddings, embedding_dim), device="meta",
                                                     dtype=dtype or torch.get_default_dtype()), requires_grad=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        _lazy_load(self, state_dict, prefix, local_metadata, missing_keys, unexpected_keys,
                   (self.num_embeddings, self.embedding_dim), False)


LazyOps = SimpleNamespace(Linear=LazyLinear, Embedding=LazyEmbedding)


def test_lazy_layers_really_hide_their_weights():
    """The premise: such a module's state_dict lacks the Linear weights (what broke the pack under dynamic VRAM)."""
    with torch.device("meta"):
        lin = LazyLinear(4, 3)
    assert "weight" not in lin.state_dict()


@pytest.mark.parametrize("name", ["uniar-tiny", "uniar-tiny-bsq64"])
def test_ar_model_with_lazy_layers_loads_and_matches(name):
    ck = Checkpoint(ckpt_path(name))
    lazy = ck.load_ar(device="cpu", dtype="float32", ops=LazyOps)
    assert all(isinstance(m.weight, torch.nn.Parameter) and not m.weight.is_meta
               for m in lazy.modules() if isinstance(m, (LazyLinear, LazyEmbedding)))
    ck0, plain = load_model(name)
    ref = dict(plain.state_dict())
    got = dict(lazy.state_dict())
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    a = api.UniAR(ck, lazy).generate(["a red cube"], 64, 64, seed=3)
    b = api.UniAR(ck0, plain).generate(["a red cube"], 64, 64, seed=3)
    assert torch.equal(a.indices, b.indices)
    img = load_image(TEST_IMAGE)
    assert torch.equal(api.UniAR(ck, lazy).encode(img).indices, api.UniAR(ck0, plain).encode(img).indices)


def test_adding_components_to_a_lazy_model_reuses_its_tensors():
    ck = Checkpoint(ckpt_path("uniar-tiny-bsq64"))
    first = ck.load_ar(components=("llm", "lm_head"), device="cpu", dtype="float32", ops=LazyOps)
    w = first.lm_head.weight
    both = ck.load_ar(components=("gen_head",), device="cpu", dtype="float32", ops=LazyOps, reuse=first)
    assert both.lm_head.weight.data_ptr() == w.data_ptr()
    assert both.output_layer_vistok is not None and not any(p.is_meta for p in both.parameters())


def test_decoder_bsq_projections_with_lazy_layers():
    from uniar_backend.decoder.components import load_bsq_projections

    root = ckpt_path("uniar-tiny-bsq64")
    lazy, fp = load_bsq_projections(root, "cpu", torch.float32, ops=LazyOps)
    plain, fp0 = load_bsq_projections(root, "cpu", torch.float32)
    assert fp == fp0
    ref = plain.state_dict()
    assert lazy.state_dict().keys() == ref.keys()
    assert all(torch.equal(lazy.state_dict()[k], ref[k]) for k in ref)


def test_decoder_dit_with_lazy_layers():
    """The DiT is built from the layer namespace too (ComfyUI streams and casts its Linears): lazily created
    layers take every weight and the decode is the same."""
    from uniar_backend.decoder import load_decoder

    root = ckpt_path("uniar-tiny")
    lazy = load_decoder(root, device="cpu", dtype="float32", ops=LazyOps)
    plain = load_decoder(root, device="cpu", dtype="float32")
    assert any(isinstance(m, LazyLinear) for m in lazy.transformer.modules())
    ref = plain.transformer.state_dict()
    assert lazy.transformer.state_dict().keys() == ref.keys()
    assert all(torch.equal(lazy.transformer.state_dict()[k], ref[k]) for k in ref)
    ck, m = load_model("uniar-tiny")
    tokens = api.UniAR(ck, m).generate(["a red cube"], 64, 64, seed=3)
    assert torch.equal(lazy.decode(tokens, steps=2, seed=0), plain.decode(tokens, steps=2, seed=0))


def test_a_layer_that_takes_no_tensor_is_an_error():
    """A layer class that ignores what it is given must not leave a half-empty model behind silently."""

    class Deaf(LazyLinear):
        def _load_from_state_dict(self, *args, **kwargs):  # takes nothing, reports nothing
            return None

    ck = Checkpoint(ckpt_path("uniar-tiny"))
    with pytest.raises(CheckpointError, match="without weights"):
        ck.load_ar(components=("llm",), device="cpu", dtype="float32", ops=SimpleNamespace(Linear=Deaf))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_dit_with_lazy_layers(weights):
    """Lazy layers show no bias before loading: the quantised layers take their shapes and biases from the plain
    twin (the DiT's feed-forward Linears have biases)."""
    from uniar_backend.decoder import load_decoder

    root = ckpt_path("uniar-tiny")
    lazy = load_decoder(root, device="cpu", dtype="float32", ops=LazyOps, weights=weights)
    plain = load_decoder(root, device="cpu", dtype="float32", weights=weights)
    ref = plain.transformer.state_dict()
    assert lazy.transformer.state_dict().keys() == ref.keys()
    assert all(torch.equal(lazy.transformer.state_dict()[k], ref[k]) for k in ref)
