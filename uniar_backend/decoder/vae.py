"""SD3's VAE (diffusers' ``AutoencoderKL``) as plain modules built from a layer namespace (``comfy.ops`` inside
ComfyUI: every Conv2d, Linear and GroupNorm streams and casts like the DiT's), in two halves loaded separately:

* :class:`VAEDecoder` (``post_quant_conv`` + ``decoder``): what every decode needs;
* :class:`VAEEncoder` (``encoder`` + ``quant_conv``): only for ComfyUI's VAE Encode on the native route (UniAR
  itself turns images into tokens with its vision tower, never with the VAE).

Parameter names are diffusers' (``decoder.*``, ``encoder.*``), so ``sd3_pipeline/vae``'s safetensors load as they
are, each half reading only its own tensors; the computation is diffusers' op for op (bitwise equal in float32 and
bfloat16 with sdpa attention; tested).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.layers import attention as attention_core
from ..modeling.layers import resolve_ops

EPS = 1e-6


class _Resnet(nn.Module):
    """``ResnetBlock2D`` without a time embedding: GroupNorm, SiLU, conv, twice, plus the (1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, ops):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, cin, eps=EPS, affine=True)
        self.conv1 = ops.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = ops.GroupNorm(groups, cout, eps=EPS, affine=True)
        self.conv2 = ops.Conv2d(cout, cout, 3, 1, 1)
        self.conv_shortcut = ops.Conv2d(cin, cout, 1, 1, 0, bias=True) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class _Attention(nn.Module):
    """The mid block's single-head spatial self-attention (``Attention`` with ``AttnProcessor2_0``)."""

    def __init__(self, channels: int, groups: int, ops):
        super().__init__()
        self.group_norm = ops.GroupNorm(groups, channels, eps=EPS, affine=True)
        self.to_q, self.to_k, self.to_v = (ops.Linear(channels, channels, bias=True) for _ in range(3))
        self.to_out = nn.ModuleList([ops.Linear(channels, channels, bias=True)])
        self.backend = "sdpa"

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.view(b, c, h * w).transpose(1, 2)
        t = self.group_norm(t.transpose(1, 2)).transpose(1, 2)
        q, k, v = (f(t).view(b, -1, 1, c).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = attention_core(q, k, v, None, self.backend, 1 / math.sqrt(c)).to(q.dtype)
        out = self.to_out[0](out)
        return out.transpose(-1, -2).reshape(b, c, h, w) + x


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, ops, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(channels, channels, groups, ops), _Resnet(channels, channels, groups, ops)])
        self.attentions = nn.ModuleList([_Attention(channels, groups, ops)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _Upsample(nn.Module):
    def __init__(self, channels: int, ops):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(nn.Module):
    """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: ``layers`` resnets, then the optional resampler, kept under
    diffusers' name (``downsamplers`` / ``upsamplers``) so the checkpoint's keys load as they are."""

    resampler = ""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: bool, ops):
        super().__init__()
        self.resnets = nn.ModuleList(_Resnet(cin if i == 0 else cout, cout, groups, ops) for i in range(layers))
        setattr(self, self.resampler, nn.ModuleList([self.make_resampler(cout, ops)]) if resample else None)

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        resampler = getattr(self, self.resampler)
        return resampler[0](x) if resampler is not None else x


class _UpBlock(_Block):
    resampler = "upsamplers"
    make_resampler = staticmethod(lambda ch, ops: _Upsample(ch, ops))


class _Downsample(nn.Module):
    """``Downsample2D(use_conv=True, padding=0)``: zero-pad right and bottom by one, then a stride-2 conv."""

    def __init__(self, channels: int, ops):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class _DownBlock(_Block):
    resampler = "downsamplers"
    make_resampler = staticmethod(lambda ch, ops: _Downsample(ch, ops))


class _Encoder(nn.Module):
    def __init__(self, c: SimpleNamespace, ops):
        super().__init__()
        boc, groups = list(c.block_out_channels), c.norm_num_groups
        self.conv_in = ops.Conv2d(c.in_channels, boc[0], 3, 1, 1)
        blocks, out = [], boc[0]
        for i, ch in enumerate(boc):
            prev, out = out, ch
            blocks.append(_DownBlock(prev, out, c.layers_per_block, groups, i < len(boc) - 1, ops))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _MidBlock(boc[-1], groups, ops, c.mid_block_add_attention)
        self.conv_norm_out = ops.GroupNorm(groups, boc[-1], eps=EPS, affine=True)
        self.conv_out = ops.Conv2d(boc[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class _Decoder(nn.Module):
    def __init__(self, c: SimpleNamespace, ops):
        super().__init__()
        boc, groups = list(c.block_out_channels), c.norm_num_groups
        self.conv_in = ops.Conv2d(c.latent_channels, boc[-1], 3, 1, 1)
        self.mid_block = _MidBlock(boc[-1], groups, ops, c.mid_block_add_attention)
        rev = list(reversed(boc))
        blocks, out = [], rev[0]
        for i, ch in enumerate(rev):
            prev, out = out, ch
            blocks.append(_UpBlock(prev, out, c.layers_per_block + 1, groups, i < len(boc) - 1, ops))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = ops.GroupNorm(groups, boc[0], eps=EPS, affine=True)
        self.conv_out = ops.Conv2d(boc[0], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _vae_config(cfg: dict) -> SimpleNamespace:
    c = SimpleNamespace(
            latent_channels=cfg.get("latent_channels", 4), out_channels=cfg.get("out_channels", 3),
            block_out_channels=list(cfg["block_out_channels"]), layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32), scaling_factor=cfg["scaling_factor"],
            shift_factor=cfg.get("shift_factor"), mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True), in_channels=cfg.get("in_channels", 3),
            use_quant_conv=cfg.get("use_quant_conv", True))
    if cfg.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn {cfg.get('act_fn')!r} is not supported (SD3's VAE uses silu)")
    return c


def _set_attention(mid_block, backend: str) -> None:
    """eager, else sdpa (flash-attn cannot run the one 512-wide head)."""
    if mid_block.attentions is not None:
        mid_block.attentions[0].backend = "eager" if backend == "eager" else "sdpa"


class VAEEncoder(nn.Module):
    """SD3's VAE, encoding side.  ``encode(x)`` (images in [-1, 1]) -> the latent distribution's mean (its mode:
    ``AutoencoderKL.encode(x).latent_dist.mode()``, what ComfyUI's VAE Encode returns), unscaled."""

    def __init__(self, cfg: dict, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        c = self.config = _vae_config(cfg)
        self.encoder = _Encoder(c, ops)
        self.quant_conv = (ops.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv
                           else None)

    def set_attention(self, backend: str) -> None:
        _set_attention(self.encoder.mid_block, backend)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.config.latent_channels]


class VAEDecoder(nn.Module):
    """SD3's VAE, decoding side.  ``decode(z)`` -> ``(images,)`` in [-1, 1] (diffusers' ``return_dict=False``)."""

    def __init__(self, cfg: dict, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        c = self.config = _vae_config(cfg)
        self.post_quant_conv = (ops.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv
                                else None)
        self.decoder = _Decoder(c, ops)

    def set_attention(self, backend: str) -> None:
        _set_attention(self.decoder.mid_block, backend)

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return (self.decoder(z),)
