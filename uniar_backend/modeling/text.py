"""Qwen3-VL text decoder (Qwen3-8B in UniAR): GQA attention with per-head q/k RMSNorm, interleaved mRoPE,
SwiGLU MLP, DeepStack injection; plus the preallocated KV cache used by the samplers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TextConfig
from .layers import RMSNorm, attention, rotate_half


class MRoPE:
    """Interleaved multimodal rotary embedding (Qwen3-VL): frequency slot i takes its position from axis H if
    ``i % 3 == 1 and i < 3 * section[1]``, from W if ``i % 3 == 2 and i < 3 * section[2]``, else from T."""

    def __init__(self, cfg: TextConfig):
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        half = cfg.head_dim // 2
        axis = torch.zeros(half, dtype=torch.long, device="cpu")
        for dim, offset in ((1, 1), (2, 2)):
            axis[slice(offset, cfg.mrope_section[dim] * 3, 3)] = dim
        self.axis = axis
        self._inv_freq = {}
        self._axis = {}

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = 1.0 / (
                self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / self.head_dim)
            )
        return self._inv_freq[key]

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (3, B, T) -> cos, sin (B, T, head_dim) in ``dtype`` (computed in float32)."""
        inv = self.inv_freq(position_ids.device)
        freqs = position_ids.to(torch.float32)[..., None] * inv  # (3, B, T, half)
        key = str(position_ids.device)
        axis = self._axis.get(key)
        if axis is None:
            axis = self._axis[key] = self.axis.to(position_ids.device)
        sel = torch.gather(freqs, 0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)
        emb = torch.cat((sel, sel), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Preallocated per-layer key/value buffers ``(B, Hkv, capacity, D)``; the fill level is tracked on the host."""

    def __init__(self, num_layers, batch, kv_heads, head_dim, capacity, device, dtype):
        self.k = [torch.empty(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0
        self.capacity = capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow ({end} > {self.capacity})")
        self.k[layer][:, :, start:end].copy_(k)
        self.v[layer][:, :, start:end].copy_(v)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class ConcatCache:
    """Growing cache by concatenation (what transformers' DynamicCache does; used by the reference sampler)."""

    def __init__(self, num_layers):
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.length = 0

    def update(self, layer, k, v):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        kw = dict(bias=cfg.attention_bias, device=device, dtype=dtype)
        self.q_proj = ops.Linear(cfg.hidden_size, self.num_heads * self.head_dim, **kw)
        self.k_proj = ops.Linear(cfg.hidden_size, self.num_kv * self.head_dim, **kw)
        self.v_proj = ops.Linear(cfg.hidden_size, self.num_kv * self.head_dim, **kw)
        self.o_proj = ops.Linear(self.num_heads * self.head_dim, cfg.hidden_size, **kw)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, backend="sdpa"):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = attention(q, k, v, mask, backend, self.scale, causal=True)
        return self.o_proj(out)


class TextMLP(nn.Module):
    def __init__(self, cfg: TextConfig, ops, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = ops.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TextDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.self_attn = TextAttention(cfg, ops, device, dtype)
        self.mlp = TextMLP(cfg, ops, device, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, backend="sdpa"):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_layers(layers, x, cos, sin, mask, cache=None, backend="sdpa", deepstack=None, visual_mask=None):
    """Run a stack of decoder layers; after layer j < len(deepstack) add ``deepstack[j]`` at the visual
    positions (``visual_mask`` (B, T) bool, or None = every position)."""
    for j, layer in enumerate(layers):
        x = layer(x, cos, sin, mask, cache, j, backend)
        if deepstack is not None and j < len(deepstack):
            emb = deepstack[j].to(x.dtype)
            if visual_mask is None:
                x = x + emb.view(x.shape)
            else:
                x = x.clone()
                x[visual_mask] = x[visual_mask] + emb
    return x


class TextModel(nn.Module):
    """``model.language_model``: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(TextDecoderLayer(cfg, ops, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
