"""The AR image-token samplers.

Both samplers reproduce the reference ``generate_visual`` exactly (same logits up to float rounding, the same
random stream, so the same tokens):

* ``fast`` (default): preallocated KV caches for the LLM *and* the ``visual_decoder`` stack (exact under causal
  attention: the reference recomputes the whole stack over prefix + generated positions at every step although
  only the last position is read), no host synchronisation inside the loop (sampling is the reference's
  ``multinomial(p, 1)`` written out as ``argmax(p / Exp(1))``, which is exactly what torch does for one sample,
  minus its ``.item()`` validity check), CFG rows batched.
* ``reference``: the straightforward loop of the reference (growing caches by concatenation, the stack recomputed
  over the whole sequence every step, ``torch.multinomial``), kept as the baseline for tests and benchmarks.

Random stream: every row (with cfg > 1 also the unconditional ones, which get the same mixed logits) draws its
own bits, ``2 * rows * levels * merge_unit * bsq_dim`` exponentials per step, from a generator seeded with
``seed`` immediately before sampling (a private ``torch.Generator``, which yields the same stream as
``torch.manual_seed(seed)`` without touching the global RNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .modeling.layers import additive_mask
from .modeling.text import ConcatCache, KVCache, run_layers

MODES = ("fast", "reference")


@dataclass
class Prefix:
    """Everything the sampler needs about the prompt rows (R = 2B with cfg > 1, else B)."""

    embeds: torch.Tensor  # (R, L, D) input embeddings (image features already placed)
    mask: torch.Tensor  # (R, L) bool, True for real (non-padding) tokens
    positions: torch.Tensor  # (3, R, L + N) mRoPE ids for prefix + generated tokens
    num_tokens: int  # N
    deepstack: list | None = None  # per DeepStack level: (num_visual_positions, D) for edit inputs
    visual_mask: torch.Tensor | None = None  # (R, L) bool: positions of the edit input's image tokens


def mix_and_sample(logits, cfg: float, use_cfg: bool, temperature: float, shape, generator, reference: bool):
    """CFG mixing (raw logits) + temperature + per-bit 2-way sampling. Returns bits (R, levels, unit, d) int64."""
    if use_cfg:
        half = logits.shape[0] // 2
        cond, uncond = logits[:half], logits[half:]
        mixed = uncond + cfg * (cond - uncond)
        logits = torch.cat([mixed, mixed], dim=0)
    rows = logits.shape[0]
    probs = (logits.view(-1, *shape, 2) / temperature).flatten(0, -2).softmax(-1)
    if reference:
        bits = torch.multinomial(probs, num_samples=1, generator=generator)
    else:
        q = torch.empty_like(probs).exponential_(1, generator=generator)
        bits = torch.argmax(probs / q, dim=-1)
    return bits.view(rows, *shape)


class _Common:
    def __init__(self, model, prefix: Prefix, cfg: float, temperature: float, generator, callback, logits_out):
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

    def step_done(self, i, n):
        if self.callback is not None:
            self.callback(i + 1, n)


def sample_fast(model, prefix: Prefix, cfg, temperature, generator, callback=None, logits_out=None):
    c = _Common(model, prefix, cfg, temperature, generator, callback, logits_out)
    R, L, _ = prefix.embeds.shape
    N = prefix.num_tokens
    tc = model.cfg.text
    dev, dt = c.device, c.dtype
    total = L + N
    llm_cache = KVCache(tc.num_hidden_layers, R, tc.num_key_value_heads, tc.head_dim, total, dev, dt)
    stack_cache = KVCache(len(c.stack), R, tc.num_key_value_heads, tc.head_dim, total, dev, dt)
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

    out = torch.empty(R, N, *c.shape, dtype=torch.int64, device=dev)
    for i in range(N):
        bits = mix_and_sample(logits, cfg, c.use_cfg, temperature, c.shape, generator, reference=False)
        out[:, i] = bits
        if i + 1 < N:
            x, deep = c.features(bits)
            p = positions[:, :, L + i : L + i + 1]
            cos, sin = model.rope(p, dt)
            m = key_mask[:, :, :, : L + i + 1]
            h = run_layers(c.lm.layers, x, cos, sin, m, llm_cache, c.backend, deep, None)
            llm_cache.length += 1
            s = run_layers(c.stack, h, cos, sin, m, stack_cache, c.backend)
            stack_cache.length += 1
            logits = c.logits(s[:, -1])
        c.step_done(i, N)
    return out


def sample_reference(model, prefix: Prefix, cfg, temperature, generator, callback=None, logits_out=None):
    """The reference loop, kept for tests and benchmarks (see module doc)."""
    c = _Common(model, prefix, cfg, temperature, generator, callback, logits_out)
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
        bits = mix_and_sample(logits, cfg, c.use_cfg, temperature, c.shape, generator, reference=True)
        inputs, deep = c.features(bits)  # computed at every step, the last one too (as upstream)
        generated.append(bits)
        c.step_done(i, N)
    return torch.stack(generated, dim=1)


def sample(model, prefix: Prefix, cfg: float, temperature: float, seed: int, mode: str = "fast",
           callback: Callable[[int, int], None] | None = None, logits_out: list | None = None) -> torch.Tensor:
    """Run the sampler; returns bits (R, N, levels, unit, d) int64 for all rows."""
    generator = torch.Generator(device=prefix.embeds.device)
    generator.manual_seed(seed)
    fn = sample_fast if mode == "fast" else sample_reference
    with torch.inference_mode():
        return fn(model, prefix, cfg, temperature, generator, callback, logits_out)
