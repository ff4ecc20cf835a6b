"""Text generation for captions / VQA: the token pickers (registered in :mod:`uniar_backend.sampling` as
``greedy`` and ``sampling``) and the KV-cached decode loop over the language model (prefill without a dense mask:
one unpadded row, causal attention)."""

from __future__ import annotations

from typing import Callable

import torch

from ..modeling.text import KVCache, run_layers
from ..runtime import WeightWarming
from .image import _rms_fn, _signed_sin, _Steps, linear_call


def pick_greedy(logits, generator, temperature=1.0, top_k=0, top_p=1.0):
    """The most likely token (the reference's default)."""
    return torch.argmax(logits, dim=-1)


def pick_sampling(logits, generator, temperature=1.0, top_k=0, top_p=1.0):
    """A token drawn after temperature, top-k and nucleus (top-p) filtering, as transformers' sampling."""
    scores = logits.float() / temperature
    if top_k and top_k > 0:
        k = min(int(top_k), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_text(model, embeds, positions, next_pos: int, max_new_tokens: int, eos: set[int], pick: Callable,
                  generator, pick_options: dict | None = None, deepstack=None, visual_mask=None,
                  callback: Callable[[int], None] | None = None, scores: list | None = None,
                  cpu_warm="auto") -> list[int]:
    """Token ids answering the prompt ``embeds`` (1, L, D) at mRoPE ``positions`` (3, 1, L), up to
    ``max_new_tokens`` or an ``eos`` token.  ``pick(logits, generator, **pick_options)`` chooses each token;
    ``callback(k)`` after token k (1-based); ``scores`` collects the logits of every step (parity tests);
    ``cpu_warm``: the CPU cache-warming policy of the steps (:class:`uniar_backend.runtime.WeightWarming`)."""
    lm = model.language_model
    mc = model.cfg
    dev, dt = embeds.device, embeds.dtype
    warm = WeightWarming(dev, cpu_warm)  # checks the option before any work
    L = embeds.shape[1]
    cache = KVCache(mc.text.num_hidden_layers, 1, mc.text.num_key_value_heads, mc.text.head_dim,
                    L + max_new_tokens, dev, dt)
    cos, sin = model.rope(positions.to(dev), dt)
    h = run_layers(lm.layers, embeds, cos, sin, None, cache, model.attention, deepstack, visual_mask)
    cache.length = L
    logits = model.lm_head(lm.norm(h[:, -1]))
    if scores is not None:
        scores.append(logits.float().cpu())
    # the decode steps: the image sampler's lean single-position layer step (bitwise equal to the module path in
    # float32), the final norm and the text head as lean calls too
    steps = _Steps(lm.layers, cache, warm=warm)
    norm, head = _rms_fn(lm.norm), linear_call(model.lm_head, warm)
    # rotary tables of every answer position at once (elementwise: bitwise equal to per-step tables)
    p_all = torch.arange(next_pos, next_pos + max_new_tokens, device=dev).view(1, 1, -1).expand(3, 1, -1)
    cos_all, sin_all = model.rope(p_all, dt)
    sin_all = _signed_sin(sin_all)
    out = []
    for k in range(max_new_tokens):
        nxt = pick(logits, generator, **(pick_options or {}))
        t = int(nxt)
        out.append(t)
        if callback is not None:
            callback(k + 1)
        if t in eos or k + 1 == max_new_tokens:
            break
        warm.begin()
        h = steps.step(lm.embed_tokens(nxt.view(1, 1)), cos_all[:, k : k + 1], sin_all[:, k : k + 1], L + k, None)
        logits = head(norm(h[:, -1]))
        warm.end()
        if scores is not None:
            scores.append(logits.float().cpu())
    return out
