"""Shared building blocks: the swappable layer namespace, RMSNorm, attention backends and masks."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

TORCH_OPS = SimpleNamespace(Linear=nn.Linear, LayerNorm=nn.LayerNorm, GroupNorm=nn.GroupNorm, Conv2d=nn.Conv2d,
                            Conv3d=nn.Conv3d, Embedding=nn.Embedding)


def resolve_ops(ops=None):
    """``ops`` may be any object exposing ``Linear``, ``LayerNorm``, ``GroupNorm``, ``Conv2d``, ``Conv3d`` and ``Embedding`` classes
    (e.g. ``comfy.ops.manual_cast``); missing names fall back to torch.nn."""
    if ops is None:
        return TORCH_OPS
    return SimpleNamespace(**{name: getattr(ops, name, getattr(TORCH_OPS, name)) for name in vars(TORCH_OPS)})


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, then scale (weight applied in the weight's dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight
        if w.device != x.device:
            w = w.to(x.device)
        return w * h.to(dt)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``allowed`` -> additive float mask (0 where allowed, the dtype's minimum elsewhere).

    A finite minimum (as transformers' eager path) keeps fully masked rows (padding queries) finite, so no NaN
    can leak into later layers through masked keys."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def attention(q, k, v, mask, backend: str, scale: float, causal: bool = False):
    """q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: additive (B, 1, T, S) or None. Returns (B, T, H*D).

    ``causal`` is only used when ``mask`` is None.  ``flash_attention_2`` is chosen for a CUDA device in half
    precision; a model built with it and then run elsewhere (a host moved it to the CPU: ComfyUI's Select Model
    Device) computes the same attention with SDPA."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    if backend == "flash_attention_2" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=causal and t > 1)
        return out.reshape(b, t, h * d)
    if hkv != h:
        k = k[:, :, None].expand(b, hkv, h // hkv, k.shape[2], d).reshape(b, h, k.shape[2], d)
        v = v[:, :, None].expand(b, hkv, h // hkv, v.shape[2], d).reshape(b, h, v.shape[2], d)
    if backend == "eager":
        w = torch.matmul(q, k.transpose(2, 3)) * scale
        if mask is not None:
            w = w + mask
        elif causal and t > 1:
            s = k.shape[2]
            allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            w = w + additive_mask(allowed, w.dtype)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             is_causal=(mask is None and causal and t > 1 and t == k.shape[2]))
    return out.transpose(1, 2).reshape(b, t, h * d)
