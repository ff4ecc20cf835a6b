"""The AR image-token samplers (registered in :mod:`uniar_backend.sampling` as ``fast`` and ``reference``).

Both samplers reproduce the reference ``generate_visual`` exactly (same logits up to float rounding, the same
random stream, so the same tokens):

* ``fast`` (default): preallocated KV caches for the LLM *and* the ``visual_decoder`` stack (exact under causal
  attention: the reference recomputes the whole stack over prefix + generated positions at every step although
  only the last position is read), so the per-step cost is flat; no host synchronisation inside the loop
  (sampling is the reference's ``multinomial(p, 1)`` written out as ``argmax(p / Exp(1))``, which is exactly what
  torch does for one sample, minus its ``.item()`` validity check); CFG rows batched, both halves dividing the
  same mixed probabilities; rotary tables for all generated positions computed once; a lean single-position
  layer step (one ``F.rms_norm`` per norm, q/k norms and rotary on the concatenated heads, GQA attention via
  ``enable_gqa`` without expanding the cached heads, layers called through ``F.linear``) that is *bitwise* equal
  to the module path in float32, so the LLM half of every step matches the reference exactly and only the
  stack (incremental vs recomputed) can differ in the last bits; the BSQ feature MLPs called directly (also
  bitwise).  On the CPU the loop runs single-threaded for small models (option ``cpu_threads``); on CUDA an
  optional CUDA-graph step (option ``cuda_graph``, off by default).
* ``reference``: the straightforward loop of the reference (growing caches by concatenation, the stack recomputed
  over the whole sequence every step, ``torch.multinomial``), kept as the baseline for tests and benchmarks.

Random stream: every row (with cfg > 1 also the unconditional ones, which get the same mixed logits) draws its
own bits, ``2 * rows * levels * merge_unit * bsq_dim`` exponentials per step, from a generator seeded with
``seed`` immediately before sampling (a private ``torch.Generator``, which yields the same stream as
``torch.manual_seed(seed)`` without touching the global RNG).  Given one seed per prompt (batch runs), each prompt
draws from its own generator exactly what it would draw alone, so its tokens do not depend on the other prompts'
seeds (only, in the last bits, on the batch's arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
import os

import torch
import torch.nn.functional as F

from .. import bsq
from ..modeling.layers import additive_mask
from ..modeling.text import ConcatCache, KVCache, run_layers
from ..runtime import WeightWarming


@dataclass
class Prefix:
    """Everything the sampler needs about the prompt rows (R = 2B with cfg > 1, else B)."""

    embeds: torch.Tensor  # (R, L, D) input embeddings (image features already placed)
    mask: torch.Tensor  # (R, L) bool, True for real (non-padding) tokens
    positions: torch.Tensor  # (3, R, L + N) mRoPE ids for prefix + generated tokens
    num_tokens: int  # N
    deepstack: list | None = None  # per DeepStack level: (num_visual_positions, D) for edit inputs
    visual_mask: torch.Tensor | None = None  # (R, L) bool: positions of the edit input's image tokens


def mix_and_sample(logits, cfg: float, use_cfg: bool, temperature: float, shape, generator):
    """The reference's step: CFG mixing of the raw logits copied to both halves, temperature, and
    ``torch.multinomial(p, 1)`` per bit (the fast path's equivalent is :class:`_Sampler`).
    ``generator``: one for all rows, or one per prompt (see :func:`prompt_streams`).
    Returns bits (R, levels, unit, d) int64."""
    if use_cfg:
        half = logits.shape[0] // 2
        cond, uncond = logits[:half], logits[half:]
        mixed = uncond + cfg * (cond - uncond)
        logits = torch.cat([mixed, mixed], dim=0)
    rows = logits.shape[0]
    probs = (logits.view(-1, *shape, 2) / temperature).flatten(0, -2).softmax(-1)
    if not isinstance(generator, (list, tuple)):
        bits = torch.multinomial(probs, num_samples=1, generator=generator)
        return bits.view(rows, *shape)
    # one stream per prompt: prompt j alone would draw over its rows (cond, then uncond) in this order
    B = len(generator)
    probs = probs.view(rows // B, B, -1, 2)
    bits = torch.stack([torch.multinomial(probs[:, j].reshape(-1, 2), 1, generator=g).view(rows // B, -1)
                        for j, g in enumerate(generator)], dim=1)
    return bits.view(rows, *shape)


def prompt_streams(generator, rows: int):
    """``generator`` as the sampler uses it: one ``torch.Generator`` for all rows, or a list of one per prompt
    (rows = prompts, or 2 x prompts with CFG: each prompt's unconditional row draws from that prompt's stream,
    after its conditional row, as when the prompt is sampled alone).  A list must divide the rows evenly."""
    if isinstance(generator, (list, tuple)):
        if not generator or rows % len(generator) or rows // len(generator) not in (1, 2):
            raise ValueError(f"{len(generator)} random streams for {rows} rows: give one per prompt")
        return list(generator)
    return None


class _Common:
    def __init__(self, model, prefix: Prefix, cfg: float, temperature: float, generator, callback, logits_out,
                 preview=None):
        self.model = model
        self.lm = model.language_model
        self.stack = model.visual_decoder
        self.head = model.output_layer_vistok
        self.visual = model.visual
        self.backend = model.attention
        self.prefix = prefix
        self.cfg = cfg
        self.use_cfg = cfg > 1.0
        self.temperature = temperature
        self.generator = generator
        self.callback = callback
        self.logits_out = logits_out
        self.preview = preview
        v = model.cfg.vision
        self.shape = (v.levels, v.merge_unit, v.bsq_dim)
        self.dtype = prefix.embeds.dtype
        self.device = prefix.embeds.device

    def features(self, bits):
        """Sampled bits -> (main (R, 1, D), DeepStack list of (R, D)): the LLM input of the next step."""
        main, deep = self.visual.bits_to_features(bits)
        return main.unsqueeze(1), deep

    def logits(self, hidden_last):
        out = self.head(hidden_last)
        if self.logits_out is not None:
            self.logits_out.append(out.detach().float().cpu())
        return out

    def step_done(self, i, n, drawn):
        """After step ``i`` of ``n``: progress callback, and every ``preview.every`` steps (and at the end)
        ``preview(bits drawn so far)`` with ``drawn()`` -> (R, i + 1, levels, unit, d)."""
        if self.callback is not None:
            self.callback(i + 1, n)
        if self.preview is not None and ((i + 1) % self.preview.every == 0 or i + 1 == n):
            self.preview(drawn())


# ---------------------------------------------------------------------------------------------- fast path
# Options of the fast path, arguments of ``sample_fast`` (and of ``sampling.sample(..., **options)``):
#
# ``cuda_graph``: capture the per-step network (features -> LLM -> stack -> head) in a CUDA graph and replay it
# (CUDA only; sampling stays eager, so the random stream is untouched).  Off by default until measured on a GPU
# (``python -m uniar_backend.bench --real-size`` reports both); None: the environment's UNIAR_CUDA_GRAPH=1.
#
# ``cpu_threads``: intra-op threads of the CPU decode loop (the policy: :func:`uniar_backend.runtime.loop_threads`:
# "auto", a count, or None to keep the caller's setting); the previous setting is restored after the loop.
#
# ``cpu_warm``: read each small weight through the cache right before its product in the CPU loop (the policy:
# :class:`uniar_backend.runtime.WeightWarming`: "auto" times the first steps both ways and keeps the faster, True,
# False); the products are unchanged, so the tokens are too.
STACK_MIN_ROWS = int(os.environ.get("UNIAR_STACK_MIN_ROWS", "4"))


def _cuda_graph_default() -> bool:
    return os.environ.get("UNIAR_CUDA_GRAPH", "0") == "1"


def _casts(mod) -> bool:
    """Whether a layer fetches / casts its weights per call: ComfyUI's layers (``comfy.ops``) while their weights are
    streamed or cast (``comfy_cast_weights``, weight / bias functions such as LoRA patches); plain torch layers
    never do."""
    return bool(getattr(mod, "comfy_cast_weights", False) or getattr(mod, "weight_function", None)
                or getattr(mod, "bias_function", None))


def linear_call(mod, warm=None):
    """The fastest exact call of a Linear layer, chosen by what the layer offers, not by its exact class: a layer
    whose weights are resident (plain ``nn.Linear``, ComfyUI's ``disable_weight_init`` / ``manual_cast`` layers when
    not casting) is ``F.linear(x, w, b)`` -- what its forward computes, without the module call; a layer that casts or
    streams its weights goes through its own cast path (``forward_comfy_cast_weights``: ComfyUI's transfer, LoRA
    and quantised weights, without the module call).  A layer class may also offer its own call
    (``uniar_linear()``: the quantised layers of :mod:`uniar_backend.quant`).  Anything else: the layer itself.

    ``warm``: the loop's :class:`uniar_backend.runtime.WeightWarming`; a resident weight it covers is read through
    the cache (``amax``, result unused) right before the product while ``warm.on`` (the product is unchanged)."""
    own = getattr(mod, "uniar_linear", None)
    if callable(own):
        return own()
    if isinstance(mod, torch.nn.Linear) and (type(mod) is torch.nn.Linear or hasattr(mod, "comfy_cast_weights")):
        if not _casts(mod):
            w, b = mod.weight, mod.bias
            if warm is not None and warm.covers(w):
                def warmed(x):
                    if warm.on:
                        w.amax()
                    return F.linear(x, w, b)
                return warmed
            return lambda x: F.linear(x, w, b)
        fast = getattr(mod, "forward_comfy_cast_weights", None)
        if callable(fast):
            return fast
    return mod


def layer_norm_call(mod):
    """:func:`linear_call` for LayerNorm: ``F.layer_norm`` with the layer's resident weights, the layer's cast
    path while it casts, else the layer."""
    if isinstance(mod, torch.nn.LayerNorm) and (type(mod) is torch.nn.LayerNorm or hasattr(mod, "comfy_cast_weights")):
        if not _casts(mod):
            shape, w, b, eps = mod.normalized_shape, mod.weight, mod.bias, mod.eps
            return lambda x: F.layer_norm(x, shape, w, b, eps)
        fast = getattr(mod, "forward_comfy_cast_weights", None)
        if callable(fast):
            return fast
    return mod


def _linear_fn(mod, min_rows: int = 0, warm=None):
    """:func:`linear_call`, optionally with padded rows.

    ``min_rows``: pad the rows of a single-position step with zero rows up to this count.  BLAS picks its
    matrix-vector kernel for very few rows and its matrix-matrix kernel otherwise; the two round differently,
    and the reference runs the ``visual_decoder`` stack over the whole sequence (many rows).  Padding the
    stack's step to the matrix-matrix kernel keeps its results closer to the reference's (bitwise for most
    rows on x86 MKL), which makes token flips between the modes rarer.  Rows are independent, so padding
    changes nothing else."""
    f = linear_call(mod, warm)
    if min_rows > 1:
        def padded(x):
            r = x.shape[0]
            if r >= min_rows:
                return f(x)
            xp = torch.cat([x, x.new_zeros((min_rows - r,) + tuple(x.shape[1:]))])
            return f(xp)[:r]
        return padded
    return f


def _rms_fn(norm, rows: int | None = None, second=None):
    """Qwen3 RMSNorm (layers.RMSNorm: float32 normalisation, cast back, then the weight product) as one
    ``F.rms_norm`` call in float32 (bitwise identical to the written-out formula; checked in the tests).
    ``rows``/``second``: q_norm and k_norm applied at once to (q heads, k heads) with per-head weight rows."""
    eps = norm.eps
    w = norm.weight
    if second is not None:
        w = torch.cat([norm.weight.expand(rows, norm.weight.shape[0]), second.weight.expand(-1, -1)])

    if w.dim() == 1:
        def f(x):
            if x.dtype == torch.float32 and w.dtype == torch.float32:
                return F.rms_norm(x, (x.shape[-1],), w, eps=eps)
            return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    else:
        def f(x):
            return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return f


class _Layer:
    """One text decoder layer prepared for single-position steps (the module's weights, referenced)."""

    def __init__(self, layer, min_rows: int = 0, warm=None):
        a, mlp = layer.self_attn, layer.mlp
        self.h, self.hkv, self.d = a.num_heads, a.num_kv, a.head_dim
        self.scale = a.scale
        self.norm1 = _rms_fn(layer.input_layernorm)
        self.norm2 = _rms_fn(layer.post_attention_layernorm)
        if a.q_norm.eps == a.k_norm.eps:
            kw = a.k_norm.weight.view(1, -1).expand(self.hkv, -1)
            self.qk_norm = _rms_fn(a.q_norm, self.h, _Weight(kw))
        else:
            qn, kn, h = _rms_fn(a.q_norm), _rms_fn(a.k_norm), self.h
            self.qk_norm = lambda x: torch.cat([qn(x[:, :h]), kn(x[:, h:])], dim=1)
        self.q, self.k, self.v, self.o = (_linear_fn(m, min_rows, warm)
                                          for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        self.gate, self.up, self.down = (_linear_fn(m, min_rows, warm) for m in (mlp.gate_proj, mlp.up_proj,
                                                                                 mlp.down_proj))


class _Weight:
    def __init__(self, w):
        self.weight = w


def _signed_sin(sin):
    """[-sin1, sin2]: rotate_half(x) * sin == roll(x, D/2) * [-sin1, sin2] bitwise (only signs move)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class _Steps:
    """Single-position steps through a stack of decoder layers with preallocated caches.

    ``step(x, cos, sin_signed, pos, mask)``: x (R, 1, D); the new keys/values are written at ``pos`` (a host int
    in eager mode; a 1-element device tensor in static mode, where attention runs over the whole capacity under
    ``mask``).  Same arithmetic as ``TextDecoderLayer`` (bitwise in float32 on the CPU): attention with GQA
    through ``enable_gqa`` (no copy of the cached KV heads per query head, same result).  ``grouped`` (used on
    CUDA, where the attention kernels supporting a mask do not take ``enable_gqa`` and would fall back to a copying
    path): the query heads of each KV head are passed as positions of one head instead (same maths, other
    rounding)."""

    def __init__(self, layers, cache, min_rows: int = 0, grouped: bool = False, warm=None):
        self.layers = [_Layer(l, min_rows, warm) for l in layers]
        self.cache = cache
        self.grouped = grouped

    def step(self, x, cos, sin_signed, pos, mask, deepstack=None, static: bool = False):
        R = x.shape[0]
        ks, vs = self.cache.k, self.cache.v
        n_deep = len(deepstack) if deepstack is not None else 0
        for j, ly in enumerate(self.layers):
            H, Hkv, D = ly.h, ly.hkv, ly.d
            h = ly.norm1(x)
            qk = torch.cat([ly.q(h), ly.k(h)], dim=-1).view(R, H + Hkv, D)
            v = ly.v(h).view(R, Hkv, D)
            qk = ly.qk_norm(qk)
            qk = qk * cos + torch.roll(qk, D // 2, -1) * sin_signed  # rotary, cos/sin (R, 1, D)
            kc, vc = ks[j], vs[j]
            if static:
                kc.index_copy_(2, pos, qk[:, H:, None])
                vc.index_copy_(2, pos, v[:, :, None])
                keys, values = kc, vc
            else:
                kc.select(2, pos).copy_(qk[:, H:])
                vc.select(2, pos).copy_(v)
                keys, values = kc.narrow(2, 0, pos + 1), vc.narrow(2, 0, pos + 1)
            if self.grouped:  # the g query heads of each KV head as g "positions": no KV copy on any backend
                o = F.scaled_dot_product_attention(qk[:, :H].reshape(R, Hkv, H // Hkv, D), keys, values,
                                                   attn_mask=mask, scale=ly.scale)
            else:
                o = F.scaled_dot_product_attention(qk[:, :H, None], keys, values, attn_mask=mask, scale=ly.scale,
                                                   enable_gqa=Hkv != H)
            x = x + ly.o(o.view(R, 1, H * D))
            h = ly.norm2(x)
            x = x + ly.down(F.silu(ly.gate(h)) * ly.up(h))
            if j < n_deep:
                x = x + deepstack[j].to(x.dtype).view(x.shape)
        return x


def _head_fn(head, warm=None):
    """``VistokHead.forward`` (``output_layer_vistok``, all three variants) as lean calls."""
    if head.variant == "linear":
        return linear_call(head.seq, warm)
    norm, fc = _rms_fn(head.seq[0]), linear_call(head.seq[1], warm)
    if head.variant == "layernorm":
        return lambda x: fc(norm(x))
    out = linear_call(head.seq[3], warm)
    return lambda x: out(F.gelu(fc(norm(x)), approximate="tanh"))


class _Features:
    """Sampled bits (R, levels, unit, d) -> (main (R, D), [DeepStack (R, D)]): ``VisionTower.bits_to_features``
    with its layers called through :func:`linear_call` / :func:`layer_norm_call` (same kernels and order, bitwise
    equal; the per-call module overhead is a large share of this small computation), whatever the layer class."""

    def __init__(self, visual, warm=None):
        from ..modeling.vision import _level_name

        self.visual = visual
        cfg = visual.cfg
        self.cfg = cfg
        self.levels = [self._mlp_fn(getattr(visual, _level_name("output", lv)), warm) for lv in range(cfg.levels)]
        self.merger = self._mlp_fn(visual.merger, warm)
        self.deep = [self._mlp_fn(m, warm) for m in visual.deepstack_merger_list]
        self.merger_norm = layer_norm_call(visual.merger.norm)
        self.code_dtype = getattr(visual, _level_name("output", 0)).linear_fc1.weight.dtype

    @staticmethod
    def _mlp_fn(m, warm=None):
        """``ProjMLP.forward`` as three lean calls."""
        norm, fc1, fc2 = layer_norm_call(m.norm), linear_call(m.linear_fc1, warm), linear_call(m.linear_fc2, warm)
        width, in_dim = m.norm.normalized_shape[0], m.in_dim
        return lambda x: fc2(F.gelu(fc1(norm(x.reshape(-1, width)).reshape(-1, in_dim))))

    def __call__(self, bits):
        cfg = self.cfg
        bits = bits.reshape(-1, cfg.levels, cfg.merge_unit, cfg.bsq_dim)
        codes = bsq.bits_to_codes(bits, cfg.bsq_dim, self.code_dtype)
        main, deep = None, []
        for lv in range(cfg.levels):
            hs = self.levels[lv](codes[:, lv])
            if lv == 0:
                main = self.merger(hs)
            else:
                if cfg.bsq_skip_final_layernorm:
                    hs = self.merger_norm(hs)
                deep.append(self.deep[lv - 1](hs))
        return main, deep


class _Sampler:
    """Per-step sampling of the fast path from logits (R, O): CFG mix, temperature, one 2-way draw per bit per
    row as ``argmax(p / Exp(1))`` with the exponentials drawn in the reference's order (see module doc)."""

    def __init__(self, R, shape, cfg, use_cfg, temperature, generator, dev, dtype):
        self.R, self.shape, self.cfg, self.use_cfg = R, shape, cfg, use_cfg
        self.temperature = temperature
        self.generator = generator
        self.streams = prompt_streams(generator, R)
        n = R
        for s_ in shape:
            n *= s_
        self.q = torch.empty(n, 2, device=dev, dtype=dtype)
        if self.streams is not None:  # per prompt: the buffer that prompt alone would fill, (rows of a prompt, ., 2)
            B = len(self.streams)
            self.parts = [torch.empty(R // B, n // R, 2, device=dev, dtype=dtype) for _ in range(B)]

    def _draw(self, dtype, dev):
        """The step's exponentials (R x bits, 2): one draw from the shared stream, or each prompt's own draw
        placed at its rows (row order: conditional rows of all prompts, then their unconditional rows)."""
        if self.streams is None:
            q = self.q
            if q.dtype != dtype:
                q = self.q = torch.empty(q.shape, dtype=dtype, device=dev)
            return q.exponential_(1, generator=self.generator)
        if self.parts[0].dtype != dtype:
            self.parts = [torch.empty(p.shape, dtype=dtype, device=dev) for p in self.parts]
            self.q = torch.empty(self.q.shape, dtype=dtype, device=dev)
        for p, g in zip(self.parts, self.streams):
            p.exponential_(1, generator=g)
        # into the step's buffer (no allocation per step): q viewed as (rows of a prompt, prompts, bits, 2)
        torch.stack(self.parts, dim=1, out=self.q.view(self.parts[0].shape[0], len(self.parts), -1, 2))
        return self.q

    def __call__(self, logits):
        R = self.R
        if self.use_cfg:
            half = R // 2
            cond, uncond = logits[:half], logits[half:]
            logits = uncond + self.cfg * (cond - uncond)  # both halves draw from the same mixed logits
        if self.temperature != 1.0:  # x / 1.0 == x
            logits = logits / self.temperature
        probs = logits.reshape(-1, 2).softmax(-1)
        q = self._draw(probs.dtype, probs.device)
        if self.use_cfg:  # the mixed probabilities serve both halves (no copy)
            ratio = probs.view(1, -1, 2) / q.view(2, -1, 2)
        else:
            ratio = probs / q
        return torch.argmax(ratio, dim=-1).view(R, *self.shape)


def sample_fast(model, prefix: Prefix, cfg, temperature, generator, callback=None, logits_out=None, preview=None,
                cuda_graph: bool | None = None, cpu_threads="auto", cpu_warm="auto"):
    c = _Common(model, prefix, cfg, temperature, generator, callback, logits_out, preview)
    R, L, _ = prefix.embeds.shape
    N = prefix.num_tokens
    tc = model.cfg.text
    dev, dt = c.device, c.dtype
    warm = WeightWarming(dev, cpu_warm)  # checks the option before any work
    total = L + N
    # a CUDA graph replays fixed device work: not for layers that fetch / cast their weights per call
    cuda_graph = _cuda_graph_default() if cuda_graph is None else bool(cuda_graph)
    static = cuda_graph and dev.type == "cuda" and not any(
        _casts(m) for m in model.modules())
    alloc = torch.zeros if static else torch.empty  # static steps attend over the whole (zeroed) capacity
    llm_cache = KVCache(tc.num_hidden_layers, R, tc.num_key_value_heads, tc.head_dim, total, dev, dt)
    stack_cache = KVCache(len(c.stack), R, tc.num_key_value_heads, tc.head_dim, total, dev, dt)
    if static:
        for cache in (llm_cache, stack_cache):
            cache.k = [alloc(t.shape, device=dev, dtype=dt) for t in cache.k]
            cache.v = [alloc(t.shape, device=dev, dtype=dt) for t in cache.v]
    key_valid = torch.cat([prefix.mask.to(dev), torch.ones(R, N, dtype=torch.bool, device=dev)], dim=1)
    key_mask = additive_mask(key_valid[:, None, None, :], dt)  # (R, 1, 1, L + N)
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    prefix_mask = additive_mask(causal[None, None] & key_valid[:, None, None, :L], dt)
    positions = prefix.positions.to(dev)

    cos, sin = model.rope(positions[:, :, :L], dt)
    h = run_layers(c.lm.layers, prefix.embeds, cos, sin, prefix_mask, llm_cache, c.backend,
                   prefix.deepstack, prefix.visual_mask)
    llm_cache.length = L
    s = run_layers(c.stack, h, cos, sin, prefix_mask, stack_cache, c.backend)
    stack_cache.length = L
    logits = c.logits(s[:, -1])

    # Rotary tables of every generated position at once (elementwise, so bitwise equal to per-step tables).
    cos_all, sin_all = model.rope(positions[:, :, L:], dt)  # (R, N, D)
    sin_all = _signed_sin(sin_all)
    gpu = dev.type == "cuda"
    llm = _Steps(c.lm.layers, llm_cache, grouped=gpu, warm=warm)
    stack = _Steps(c.stack, stack_cache, STACK_MIN_ROWS if dev.type == "cpu" else 0, grouped=gpu, warm=warm)
    sampler = _Sampler(R, c.shape, cfg, c.use_cfg, temperature, generator, dev, logits.dtype)
    features = _Features(c.visual, warm)
    head = _head_fn(c.head, warm)

    def network(bits, cos_i, sin_i, pos, mask, static_mode=False):
        main, deep = features(bits)
        x = main.view(R, 1, -1).to(dt)
        h = llm.step(x, cos_i, sin_i, pos, mask, deep, static_mode)
        s = stack.step(h, cos_i, sin_i, pos, mask, None, static_mode)
        return head(s[:, -1])

    graph = _GraphStep(network, R, c.shape, L, N, key_mask, cos_all, sin_all, dev) if static and N > 1 else None

    out = torch.empty(R, N, *c.shape, dtype=torch.int64, device=dev)
    threads = _loop_threads(model, dev, cpu_threads)
    saved = torch.get_num_threads()
    if threads is not None and threads != saved:
        torch.set_num_threads(threads)
    try:
        for i in range(N):
            bits = sampler(logits)
            out[:, i] = bits
            if i + 1 < N:
                if graph is not None:
                    logits = graph(bits, i)
                else:
                    warm.begin()
                    logits = network(bits, cos_all[:, i : i + 1], sin_all[:, i : i + 1], L + i,
                                     key_mask[:, :, :, : L + i + 1])
                    warm.end()
                if logits_out is not None:
                    logits_out.append(logits.detach().float().cpu())
            c.step_done(i, N, lambda: out[:, : i + 1])
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
    return out


def step_weight_bytes(model) -> int:
    """Bytes of the weights one AR step reads (LLM layers, stack, vistok head)."""
    mods = [model.language_model.layers, model.visual_decoder, model.output_layer_vistok]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def _loop_threads(model, dev, setting="auto"):
    from ..runtime import loop_threads

    return loop_threads(dev, step_weight_bytes(model), setting)


class _GraphStep:
    """The per-step network captured in a CUDA graph (static shapes: attention over the whole cache capacity
    with future positions masked; the write position, rotary rows and mask row live in device buffers)."""

    def __init__(self, network, R, shape, L, N, key_mask, cos_all, sin_all, dev):
        self.L = L
        self.cos_all, self.sin_all = cos_all, sin_all
        total = L + N
        self.key_mask = key_mask  # (R, 1, 1, total)
        self.future = torch.full((total,), torch.finfo(key_mask.dtype).min, dtype=key_mask.dtype, device=dev)
        self.bits = torch.zeros(R, *shape, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.cos = torch.empty_like(cos_all[:, :1])
        self.sin = torch.empty_like(sin_all[:, :1])
        self.mask = key_mask.clone()
        self.network = network
        self.graph = None
        self.out = None

    def _set(self, bits, i):
        p = self.L + i
        self.bits.copy_(bits)
        self.pos.fill_(p)
        self.cos.copy_(self.cos_all[:, i : i + 1])
        self.sin.copy_(self.sin_all[:, i : i + 1])
        m = self.key_mask.clone()
        m[..., p + 1 :] = self.future[p + 1 :]
        self.mask.copy_(m)

    def _run(self):
        return self.network(self.bits, self.cos, self.sin, self.pos, self.mask, static_mode=True)

    def __call__(self, bits, i):
        self._set(bits, i)
        if self.graph is None:
            # warm up on a side stream (allocator / cuBLAS workspaces), then capture
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._run()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        self.graph.replay()
        return self.out


def sample_reference(model, prefix: Prefix, cfg, temperature, generator, callback=None, logits_out=None,
                     preview=None):
    """The reference loop, kept for tests and benchmarks (see module doc)."""
    c = _Common(model, prefix, cfg, temperature, generator, callback, logits_out, preview)
    R, L, _ = prefix.embeds.shape
    N = prefix.num_tokens
    dev, dt = c.device, c.dtype
    positions = prefix.positions.to(dev)
    mask2d = prefix.mask.to(dev)
    cache = ConcatCache(model.cfg.text.num_hidden_layers)

    def full_mask(valid):  # causal within the row AND padded keys excluded (flash-attn varlen semantics)
        n = valid.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        return additive_mask(causal[None, None] & valid[:, None, None, :], dt)

    cos, sin = model.rope(positions[:, :, :L], dt)
    P = run_layers(c.lm.layers, prefix.embeds, cos, sin, full_mask(mask2d), cache, c.backend,
                   prefix.deepstack, prefix.visual_mask)
    hidden = [P[:, -1:]]
    generated = []
    inputs = deep = None
    for i in range(N):
        if i > 0:
            mask2d = torch.cat([mask2d, torch.ones(R, 1, dtype=torch.bool, device=dev)], dim=1)
            p = positions[:, :, L + i - 1 : L + i]
            cos, sin = model.rope(p, dt)
            m = additive_mask(mask2d[:, None, None, :], dt)
            h = run_layers(c.lm.layers, inputs, cos, sin, m, cache, c.backend, deep, None)
            hidden.append(h[:, -1:])
        seq = torch.cat([P[:, :-1]] + hidden, dim=1)  # re-concatenated every step, as upstream
        cos, sin = model.rope(positions[:, :, : seq.shape[1]], dt)
        s = run_layers(c.stack, seq, cos, sin, full_mask(mask2d), None, c.backend)  # whole stack, no cache
        logits = c.logits(s[:, -1])
        bits = mix_and_sample(logits, cfg, c.use_cfg, temperature, c.shape, generator)
        inputs, deep = c.features(bits)  # computed at every step, the last one too (as upstream)
        generated.append(bits)
        c.step_done(i, N, lambda: torch.stack(generated, dim=1))
    return torch.stack(generated, dim=1)
