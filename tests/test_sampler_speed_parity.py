"""Fast sampler vs reference loop: identical tokens, first-step logits within 1e-5, the goldens reproduced.

Random tiny models come from ``uniar_backend.tools.synthetic`` (no files); the goldens from the shared fixtures
(skipped when the fixtures are not present)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from uniar_backend.sampling import image as sampling  # the samplers themselves (internals are tested)
from uniar_backend.tools import synthetic
from uniar_backend.tools.bench import grid_for, make_prefix
from uniar_backend.modeling.layers import RMSNorm
from uniar_backend.sampling import Prefix, sample

FIXTURES = os.environ.get("UNIAR_FIXTURES", "/work/shared/fixtures")
GOLDEN = os.path.join(FIXTURES, "golden")


def _tiny(seed=0, **kw):
    args = dict(hidden=64, layers=3, stack_depth=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=704,
                bsq_dim=16)
    args.update(kw)
    cfg = synthetic.make_config(**args)
    return synthetic.random_model(cfg, ("llm", "vision", "gen_head"), "cpu", torch.float32, seed=seed)


def _both(model, prefix, cfg=1.5, temperature=1.0, seed=0):
    out = {}
    for mode in ("fast", "reference"):
        lo = []
        bits = sample(model, prefix, cfg, temperature, seed, mode, logits_out=lo)
        out[mode] = (bits, lo)
    return out


def _check(out, n):
    fb, fl = out["fast"]
    rb, rl = out["reference"]
    assert fb.shape == rb.shape and fb.shape[1] == n
    assert torch.equal(fb, rb)
    assert len(fl) == len(rl) == n
    assert (fl[0] - rl[0]).abs().max().item() <= 1e-5
    for a, b in zip(fl, rl):
        assert (a - b).abs().max().item() <= 1e-4


def _prefix_rows(model, rows, cols, lens, seed=0, edit=None):
    """A prefix with len(lens) rows, row r holding lens[r] real tokens (left padding), like build_prefix."""
    from uniar_backend import prompting

    mc = model.cfg
    g = torch.Generator().manual_seed(seed)
    R, L, N = len(lens), max(lens), rows * cols
    ids = torch.randint(0, 600, (R, L), generator=g)
    mask = torch.zeros(R, L, dtype=torch.long)
    for r, n in enumerate(lens):
        mask[r, L - n:] = 1
    ids[:, -1] = mc.vision_start_token_id
    grids = [[(1, 2 * rows, 2 * cols)] for _ in range(R)]
    deep = vmask = None
    embeds = None
    if edit is not None:  # an edit image of e x e tokens placed inside every row's prompt
        e = edit
        n_img = e * e
        pre = torch.randint(0, 600, (R, 3), generator=g)
        img = torch.cat([torch.full((R, 1), mc.vision_start_token_id), torch.full((R, n_img), mc.image_token_id),
                         torch.full((R, 1), mc.vision_end_token_id)], dim=1)
        ids = torch.cat([pre, img, ids], dim=1)
        mask = torch.cat([torch.ones(R, 3 + n_img + 2, dtype=torch.long), mask], dim=1)
        # move the left padding to the front of the row
        for r in range(R):
            valid = mask[r].bool()
            ids[r] = torch.cat([ids[r][~valid], ids[r][valid]])
            mask[r] = torch.cat([mask[r][~valid], mask[r][valid]])
        grids = [[(1, 2 * e, 2 * e), (1, 2 * rows, 2 * cols)] for _ in range(R)]
        bits = torch.randint(0, 2, (R * n_img, mc.vision.levels, mc.vision.merge_unit, mc.vision.bsq_dim),
                             generator=g)
        with torch.inference_mode():
            main, deep = model.visual.bits_to_features(bits)
            vmask = ids == mc.image_token_id
            embeds = model.language_model.embed_tokens(ids).clone()
            embeds[vmask] = main
    L = ids.shape[1]
    all_ids = torch.cat([ids, torch.full((R, N), mc.image_token_id)], dim=1)
    all_mask = torch.cat([mask, torch.ones(R, N, dtype=torch.long)], dim=1)
    pos = prompting.rope_index(all_ids, all_mask, grids, mc.image_token_id, mc.vision_start_token_id, 2)
    if embeds is None:
        with torch.inference_mode():
            embeds = model.language_model.embed_tokens(ids)
    return Prefix(embeds=embeds, mask=mask.bool(), positions=pos, num_tokens=N, deepstack=deep, visual_mask=vmask)


# ---------------------------------------------------------------------------------------------- random models
@pytest.mark.parametrize("bsq_dim", [16, 64])
def test_cfg_batch1(bsq_dim):
    m = _tiny(bsq_dim=bsq_dim)
    p = make_prefix(m, 3, 4, prompt_len=12, uncond_len=7)
    _check(_both(m, p), 12)


def test_cfg_batch2_odd_grid_temperature():
    m = _tiny(seed=3, layers=2, heads=6, kv_heads=2, head_dim=8, hidden=48)
    # 2 prompts -> 4 rows (cond, cond, uncond, uncond), different lengths, odd 3 x 5 grid
    p = _prefix_rows(m, 3, 5, [11, 9, 6, 4], seed=5)
    _check(_both(m, p, cfg=3.0, temperature=0.7, seed=123), 15)


@pytest.mark.parametrize("cfg", [1.0, 0.5])
def test_no_cfg_rows_independent(cfg):
    m = _tiny(seed=1)
    p = _prefix_rows(m, 1, 7, [10, 8], seed=2)  # cfg <= 1: every row its own sample
    _check(_both(m, p, cfg=cfg, seed=9), 7)


def test_edit_input_with_deepstack():
    m = _tiny(seed=2, bsq_dim=64)
    p = _prefix_rows(m, 2, 2, [9, 5], seed=4, edit=2)
    assert p.deepstack is not None and p.visual_mask is not None
    _check(_both(m, p, seed=77), 4)


def test_gqa_none_and_mha_and_single_step():
    m = _tiny(seed=4, heads=4, kv_heads=4)  # no grouping
    _check(_both(m, make_prefix(m, 2, 3, prompt_len=8, uncond_len=8)), 6)
    _check(_both(m, make_prefix(m, 1, 1, prompt_len=8, uncond_len=3)), 1)


def test_head_variants():
    for hv in ("linear", "mlp"):
        cfg = synthetic.make_config(hidden=32, layers=2, stack_depth=1, heads=2, kv_heads=1, head_dim=16,
                                    intermediate=64, bsq_dim=16, head_variant=hv)
        m = synthetic.random_model(cfg, ("llm", "vision", "gen_head"), seed=6)
        _check(_both(m, make_prefix(m, 2, 2, prompt_len=6, uncond_len=4)), 4)


def test_fast_does_not_touch_global_rng_or_threads():
    m = _tiny(seed=7)
    p = make_prefix(m, 2, 2, prompt_len=6, uncond_len=4)
    torch.manual_seed(42)
    before = torch.rand(3)
    torch.manual_seed(42)
    threads = torch.get_num_threads()
    sample(m, p, 1.5, 1.0, 0, "fast")
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), before)


def test_forced_thread_counts_same_tokens():
    m = _tiny(seed=8)
    p = make_prefix(m, 2, 3, prompt_len=8, uncond_len=5)
    outs = []
    for opt in ("auto", 1, None):
        outs.append(sample(m, p, 1.5, 1.0, 3, "fast", cpu_threads=opt))  # sampler options are arguments
    assert all(torch.equal(outs[0], o) for o in outs)
    with pytest.raises(TypeError):
        sample(m, p, 1.5, 1.0, 3, "fast", nonsense=1)


def test_cache_warming_changes_nothing_but_time(monkeypatch):
    """CPU cache warming (read each small weight right before its product) forced on, off, or chosen by timing the
    first steps: the same logits, bitwise, and the same tokens; while on, the covered weights are read first."""
    m = _tiny(seed=12)
    p = make_prefix(m, 3, 4, prompt_len=8, uncond_len=5)  # 12 steps: the 'auto' trial (steps 1..8) and after
    reads = []
    amax = torch.Tensor.amax
    monkeypatch.setattr(torch.Tensor, "amax", lambda t, *a, **k: (reads.append(t.shape), amax(t, *a, **k))[1])
    runs = {}
    for opt in (False, True, "auto"):
        reads.clear()
        lo = []
        runs[opt] = (sample(m, p, 1.5, 1.0, 4, "fast", logits_out=lo, cpu_warm=opt), lo, len(reads))
    (b0, l0, n0), (b1, l1, n1), (b2, l2, _) = runs[False], runs[True], runs["auto"]
    assert torch.equal(b0, b1) and torch.equal(b0, b2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(l0, l1, l2))
    assert n0 == 0 and n1 > 0
    assert torch.Size([m.cfg.text.intermediate_size, m.cfg.text.hidden_size]) in reads  # an MLP weight (gate / up)
    with pytest.raises(Exception, match="cpu_warm must be"):
        sample(m, p, 1.5, 1.0, 4, "fast", cpu_warm="sometimes")


def test_cache_warming_policy(monkeypatch):
    """'auto' times steps 1..8 alternately without / with warming (step 0 untimed) and keeps the faster by median;
    only CPU loops and weights up to CPU_WARM_MAX_BYTES warm."""
    from uniar_backend import runtime

    now = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: now[0])

    def run(cost_off, cost_on, steps=12):
        w = runtime.WeightWarming(torch.device("cpu"), "auto")
        seen = []
        for _ in range(steps):
            w.begin()
            seen.append(w.on)
            now[0] += cost_on if w.on else cost_off
            w.end()
        return w, seen

    w, seen = run(2.0, 1.0)
    assert seen[1:9] == [False, True] * 4 and seen[9:] == [True] * 3
    assert len(w.times[0]) == len(w.times[1]) == 4
    w, seen = run(1.0, 2.0)
    assert seen[9:] == [False] * 3 and not w.on
    assert not runtime.WeightWarming(torch.device("cuda"), "auto").covers(torch.zeros(4))
    assert not runtime.WeightWarming(torch.device("cpu"), False).covers(torch.zeros(4))
    on = runtime.WeightWarming(torch.device("cpu"), True)
    assert on.on and on.covers(torch.zeros(4))
    assert not on.covers(torch.zeros(runtime.CPU_WARM_MAX_BYTES // 4 + 1))


def test_text_loop_cache_warming_same_tokens_and_scores():
    from uniar_backend.sampling import generate_text
    from uniar_backend.sampling.text import pick_greedy

    cfg = synthetic.make_config(hidden=64, layers=3, stack_depth=2, heads=4, kv_heads=2, head_dim=16,
                                intermediate=96, vocab=704, bsq_dim=16)
    m = synthetic.random_model(cfg, ("llm", "lm_head"), "cpu", torch.float32, seed=13)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 600, (1, 12), generator=g)
    pos = torch.arange(12).view(1, 1, -1).expand(3, 1, -1)
    outs = []
    with torch.inference_mode():
        embeds = m.language_model.embed_tokens(ids)
        for opt in (False, True, "auto"):
            scores = []
            toks = generate_text(m, embeds, pos, 12, 14, set(), pick_greedy, None, scores=scores, cpu_warm=opt)
            outs.append((toks, scores))
    assert len(outs[0][0]) == 14
    assert all(o[0] == outs[0][0] for o in outs)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0][1], o[1]))


def test_static_step_matches_eager_on_cpu():
    """The CUDA-graph step's static formulation (attention over the whole zeroed cache under a mask, write
    position as a tensor) computed eagerly on the CPU gives the same logits as the eager step."""
    m = _tiny(seed=9)
    p = make_prefix(m, 2, 3, prompt_len=8, uncond_len=5)
    R, L, _ = p.embeds.shape
    N = p.num_tokens
    tc = m.cfg.text
    from uniar_backend.modeling.layers import additive_mask
    from uniar_backend.modeling.text import KVCache, run_layers

    def prefill(zero):
        caches = []
        for n in (tc.num_hidden_layers, len(m.visual_decoder)):
            c = KVCache(n, R, tc.num_key_value_heads, tc.head_dim, L + N, "cpu", torch.float32)
            if zero:
                c.k = [torch.zeros_like(t) for t in c.k]
                c.v = [torch.zeros_like(t) for t in c.v]
            caches.append(c)
        valid = torch.cat([p.mask, torch.ones(R, N, dtype=torch.bool)], 1)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        pm = additive_mask(causal[None, None] & valid[:, None, None, :L], torch.float32)
        cos, sin = m.rope(p.positions[:, :, :L], torch.float32)
        with torch.inference_mode():
            h = run_layers(m.language_model.layers, p.embeds, cos, sin, pm, caches[0])
            run_layers(m.visual_decoder, h, cos, sin, pm, caches[1])
        return caches, additive_mask(valid[:, None, None, :], torch.float32)

    bits = torch.randint(0, 2, (R, 4, 4, 16), generator=torch.Generator().manual_seed(0))
    cos, sin = m.rope(p.positions[:, :, L:L + 1], torch.float32)
    sin = sampling._signed_sin(sin)
    with torch.inference_mode():
        main, deep = m.visual.bits_to_features(bits)
        res = []
        for static in (False, True):
            (llm_c, st_c), km = prefill(static)
            llm, st = sampling._Steps(m.language_model.layers, llm_c), sampling._Steps(m.visual_decoder, st_c)
            if static:
                mask = km.clone()
                mask[..., L + 1:] = torch.finfo(torch.float32).min
                pos = torch.tensor([L])
            else:
                mask, pos = km[..., : L + 1], L
            h = llm.step(main.view(R, 1, -1), cos, sin, pos, mask, deep, static)
            s = st.step(h, cos, sin, pos, mask, None, static)
            res.append(m.output_layer_vistok(s[:, -1]))
    assert (res[0] - res[1]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- building blocks
def test_rms_norm_and_rotary_rewrites_are_bitwise():
    torch.manual_seed(0)
    for shape in [(2, 1, 256), (3, 1, 10, 32), (2, 7, 64)]:
        x = torch.randn(shape)
        norm = RMSNorm(shape[-1], 1e-6)
        norm.weight.data = 1 + 0.1 * torch.randn(shape[-1])
        fn = sampling._rms_fn(norm)
        assert torch.equal(fn(x), norm(x))
        bf = x.bfloat16()
        norm_bf = RMSNorm(shape[-1], 1e-6, dtype=torch.bfloat16)
        norm_bf.weight.data = norm.weight.data.bfloat16()
        assert torch.equal(sampling._rms_fn(norm_bf)(bf), norm_bf(bf))
    from uniar_backend.modeling.layers import rotate_half

    x, cos, sin = torch.randn(2, 10, 32), torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    want = x * cos + rotate_half(x) * sin
    got = x * cos + torch.roll(x, 16, -1) * sampling._signed_sin(sin)
    assert torch.equal(want, got)


def test_batched_features_bitwise():
    m = _tiny(seed=11, bsq_dim=64)
    bits = torch.randint(0, 2, (6, 4, 4, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a_main, a_deep = m.visual.bits_to_features(bits)
        b_main, b_deep = sampling._Features(m.visual)(bits)
    assert torch.equal(a_main, b_main)
    assert all(torch.equal(a, b) for a, b in zip(a_deep, b_deep))


def test_gqa_attention_bitwise_to_expanded_heads():
    q, k, v = torch.randn(2, 8, 1, 32), torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    mask = torch.zeros(2, 1, 1, 40)
    mask[1, ..., :5] = torch.finfo(torch.float32).min
    ke = k[:, :, None].expand(2, 2, 4, 40, 32).reshape(2, 8, 40, 32)
    ve = v[:, :, None].expand(2, 2, 4, 40, 32).reshape(2, 8, 40, 32)
    want = F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask, scale=0.2)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    assert torch.equal(want, got)


def test_grid_for():
    assert grid_for(256) == (16, 16) and grid_for(900) == (30, 30) and grid_for(12) == (3, 4)
    assert grid_for(7) == (1, 7)


# ---------------------------------------------------------------------------------------------- goldens
GOLDENS = [("b1_t2i_64x64_cfg1.5", "A red cube on a blue table.", 64, 64, 1234, False),
           ("b3_t2i_96x128_cfg1.5", "A cat sitting on a wooden chair next to a window.", 96, 128, 4321, False),
           ("c1_edit_64x64_cfg1.5", "Make the sky purple.", 64, 64, 777, True)]


@pytest.mark.skipif(not os.path.isdir(GOLDEN), reason="shared fixtures not present")
@pytest.mark.parametrize("name", ["uniar-tiny", "uniar-tiny-bsq64"])
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_goldens(name, mode):
    from safetensors.torch import load_file

    from uniar_backend import api
    from uniar_backend.loader import Checkpoint
    from uniar_backend.preprocess import load_image

    ck = Checkpoint(os.path.join(FIXTURES, name))
    m = ck.load_ar(device="cpu", dtype="float32")
    for gname, prompt, h, w, seed, edit in GOLDENS:
        path = os.path.join(GOLDEN, name, gname + ".safetensors")
        if not os.path.isfile(path):
            continue
        g = load_file(path)
        ei = [load_image(os.path.join(GOLDEN, "test_image.png"))] if edit else None
        info, lo = {}, []
        toks = api.UniAR(ck, m).generate([prompt], h, w, cfg=1.5, temperature=1.0, seed=seed, edit_images=ei, mode=mode,
                            logits_out=lo, info=info)
        assert torch.equal(info["input_ids"], g["prefix_input_ids"]), gname
        assert torch.equal(toks.indices, g["indices"]), gname
        gl = g["vistok_head_logits"]
        lg = torch.stack(lo)
        assert (lg[0] - gl[0]).abs().max().item() <= 1e-5, gname
        assert (lg - gl).abs().max().item() <= 5e-5, gname


@pytest.mark.skipif(not os.path.isdir(GOLDEN), reason="shared fixtures not present")
@pytest.mark.parametrize("name", ["uniar-tiny", "uniar-tiny-bsq64"])
def test_golden_cfg1_both_rows(name):
    """b2 (cfg 1.0): the reference returns the conditional AND the empty-prompt row; the sampler on that 2-row
    prefix reproduces both (``api.generate`` deliberately computes only the conditional row)."""
    from safetensors.torch import load_file

    from uniar_backend import api, bsq
    from uniar_backend.loader import Checkpoint

    gname = "b2_t2i_64x64_cfg1.0"
    path = os.path.join(GOLDEN, name, gname + ".safetensors")
    if not os.path.isfile(path):
        pytest.skip("no b2 golden")
    g = load_file(path)
    meta = json.load(open(os.path.join(GOLDEN, name, "manifest.json")))["steps"][gname]
    ck = Checkpoint(os.path.join(FIXTURES, name))
    m = ck.load_ar(device="cpu", dtype="float32")
    prefix, info = api.UniAR(ck, m).prefix([meta["prompt"], ""], meta["ar_height"], meta["ar_width"], meta["cfg"])
    assert torch.equal(info["input_ids"], g["prefix_input_ids"])
    for mode in ("fast", "reference"):
        lo = []
        bits = sample(m, prefix, float(meta["cfg"]), float(meta["temperature"]), meta["seed"], mode, logits_out=lo)
        assert torch.equal(bsq.bits_to_indices(bits), g["indices"]), mode
        assert (lo[0] - g["vistok_head_logits"][0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_live_preview_sees_the_bits_drawn_so_far(mode):
    """The preview hook gets the bits drawn so far every `every` steps and at the end, and changes nothing."""
    m = _tiny(seed=2)
    p = make_prefix(m, 3, 4, prompt_len=10, uncond_len=6)
    seen = []

    def preview(drawn):
        seen.append(drawn.clone())

    preview.every = 4
    plain = sample(m, p, 1.5, 1.0, 9, mode)
    with_preview = sample(m, p, 1.5, 1.0, 9, mode, preview=preview)
    assert torch.equal(plain, with_preview)
    assert [s.shape[1] for s in seen] == [4, 8, 12]
    for s in seen:
        assert torch.equal(s, plain[:, : s.shape[1]])
    seen.clear()
    preview.every = 5  # not a divisor of 12: the last step still shows the whole picture
    sample(m, p, 1.5, 1.0, 9, mode, preview=preview)
    assert [s.shape[1] for s in seen] == [5, 10, 12]


# ---------------------------------------------------------------------------------------------- any layer class
class _ComfyLikeLinear(torch.nn.Linear):
    """The surface of ComfyUI's comfy.ops Linear that the lean step reads: ``comfy_cast_weights``, weight / bias
    function lists and ``forward_comfy_cast_weights`` (here counting its calls; ComfyUI's fetches, casts and
    streams the weights there)."""
    comfy_cast_weights = False
    weight_function = []
    bias_function = []
    cast_calls = 0

    def forward_comfy_cast_weights(self, x):
        type(self).cast_calls += 1
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _ComfyLikeLayerNorm(torch.nn.LayerNorm):
    comfy_cast_weights = False
    weight_function = []
    bias_function = []

    def forward_comfy_cast_weights(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


@pytest.mark.parametrize("casting", [False, True])
def test_lean_step_under_comfy_like_layers(casting):
    """ComfyUI-style layers take the lean path (no module forward per step), resident or casting, same tokens."""
    from types import SimpleNamespace

    from uniar_backend.tools.bench import ModuleCalls, with_layers

    plain = _tiny(seed=4)
    ops = SimpleNamespace(Linear=_ComfyLikeLinear, LayerNorm=_ComfyLikeLayerNorm)
    comfy = with_layers(plain, ops)
    for m in comfy.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = casting
    p = make_prefix(plain, 3, 4, prompt_len=10, uncond_len=6)
    counter, marks = ModuleCalls(comfy), []
    _ComfyLikeLinear.cast_calls = 0
    got = sample(comfy, p, 1.5, 1.0, 5, "fast", callback=lambda i, n: marks.append(counter.count))
    counter.close()
    assert torch.equal(got, sample(plain, p, 1.5, 1.0, 5, "fast"))
    assert marks[-1] - marks[0] == 0  # steps 2..N: every layer call through the lean path
    assert (_ComfyLikeLinear.cast_calls > 0) == casting


# ---------------------------------------------------------------------------------------------- registry
def test_sampler_registry_is_free_to_read_and_drives_the_cli(monkeypatch):
    """The registry imports no torch (the CLI and the node schemas read it); a sampler added there is a CLI choice
    and runs through sample()."""
    import subprocess
    import sys

    code = "import sys, uniar_backend.sampling as s; assert 'torch' not in sys.modules, 'torch'; print(s.MODES)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "fast" in r.stdout, r.stderr

    import uniar_backend.sampling as registry
    from uniar_backend.cli import build_parser

    monkeypatch.setitem(registry.IMAGE_SAMPLERS, "mine", "uniar_backend.sampling.image:sample_reference")
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", "--height", "64", "--width", "64",
                                      "--mode", "mine", "--out", "o.safetensors"])
    assert args.mode == "mine"
    m = _tiny(seed=1)
    p = make_prefix(m, 2, 2, prompt_len=6, uncond_len=4)
    assert torch.equal(sample(m, p, 1.5, 1.0, 3, "mine"), sample(m, p, 1.5, 1.0, 3, "reference"))
    with pytest.raises(Exception, match="mode must be one of"):
        sample(m, p, 1.5, 1.0, 3, "nonexistent")
