"""UniAR vision tower: the Qwen3-VL SigLIP2 ViT with Binary Spherical Quantization bottlenecks at 4 levels
(final block + DeepStack blocks), the BSQ output projections and the patch mergers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import bsq
from ..config import VisionConfig
from .layers import attention, rotate_half


class ProjMLP(nn.Module):
    """``UniARPatchMerger`` / ``Qwen3VLVisionPatchMerger``: LayerNorm -> Linear -> GELU(erf) -> Linear.

    ``norm_dim`` is the LayerNorm width: the input width (post-shuffle norm) or the per-patch width (then the
    normalised patches are concatenated ``group`` at a time before the first Linear)."""

    def __init__(self, in_dim, mid_dim, out_dim, norm_dim, ops, device=None, dtype=None):
        super().__init__()
        self.in_dim = in_dim
        self.norm = ops.LayerNorm(norm_dim, eps=1e-6, device=device, dtype=dtype)
        self.linear_fc1 = ops.Linear(in_dim, mid_dim, device=device, dtype=dtype)
        self.linear_fc2 = ops.Linear(mid_dim, out_dim, device=device, dtype=dtype)

    def forward(self, x):
        x = self.norm(x.reshape(-1, self.norm.normalized_shape[0])).reshape(-1, self.in_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, ops, device=None, dtype=None):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = ops.LayerNorm(d, eps=1e-6, device=device, dtype=dtype)
        self.norm2 = ops.LayerNorm(d, eps=1e-6, device=device, dtype=dtype)
        self.attn = nn.Module()
        self.attn.qkv = ops.Linear(d, 3 * d, device=device, dtype=dtype)
        self.attn.proj = ops.Linear(d, d, device=device, dtype=dtype)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = ops.Linear(d, cfg.intermediate_size, device=device, dtype=dtype)
        self.mlp.linear_fc2 = ops.Linear(cfg.intermediate_size, d, device=device, dtype=dtype)
        self.approx = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x, cos, sin, lengths, backend):
        n, d = x.shape
        hd = d // self.num_heads
        qkv = self.attn.qkv(self.norm1(x)).reshape(n, 3, self.num_heads, hd).permute(1, 0, 2, 3)
        q, k, v = qkv.unbind(0)
        dt = q.dtype
        c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = (q.float() * c + rotate_half(q.float()) * s).to(dt)
        k = (k.float() * c + rotate_half(k.float()) * s).to(dt)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, hd)
        outs = []
        for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)):
            outs.append(attention(qi, ki, vi, None, backend, hd**-0.5, causal=False))
        o = torch.cat(outs, dim=1).reshape(n, d)
        x = x + self.attn.proj(o)
        h = self.mlp.linear_fc2(F.gelu(self.mlp.linear_fc1(self.norm2(x)), approximate=self.approx))
        return x + h


def _level_name(kind: str, level: int) -> str:
    return f"bsq_{kind}_proj" if level == 0 else f"bsq_{kind}_proj_list_{level - 1}"


class BSQOutputProjections(nn.Module):
    """The per-level ``bsq_output_proj*`` MLPs (codes -> vision features).  Also what the SD3 decoder needs."""

    def __init__(self, cfg: VisionConfig, ops, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        for level in range(cfg.levels):
            setattr(self, _level_name("output", level),
                    ProjMLP(cfg.bsq_dim, cfg.bsq_hidden_dim, cfg.hidden_size, cfg.bsq_dim, ops, device, dtype))

    def level(self, level: int) -> ProjMLP:
        return getattr(self, _level_name("output", level))

    def project(self, bits: torch.Tensor) -> list[torch.Tensor]:
        """bits (..., levels, merge_unit, d) -> per level (M * merge_unit, vision_hidden) raw projections."""
        cfg = self.cfg
        bits = bits.reshape(-1, cfg.levels, cfg.merge_unit, cfg.bsq_dim)
        w = self.level(0).linear_fc1.weight
        codes = bsq.bits_to_codes(bits, cfg.bsq_dim, w.dtype if w.is_floating_point() else torch.float32)
        return [self.level(lv)(codes[:, lv]) for lv in range(cfg.levels)]


class VisionTower(nn.Module):
    """``model.visual`` of a UniAR checkpoint."""

    def __init__(self, cfg: VisionConfig, out_hidden: int, ops, device=None, dtype=None, encoder: bool = True):
        """``encoder=False`` builds only the codebook side (output projections + mergers): all that generation
        and captioning from tokens need; the ViT and the input projections are then not loaded."""
        super().__init__()
        self.cfg = cfg
        self.has_encoder = encoder
        d = cfg.hidden_size
        if encoder:
            self.patch_embed = nn.Module()
            k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
            self.patch_embed.proj = ops.Conv3d(cfg.in_channels, d, kernel_size=k, stride=k, bias=True,
                                               device=device, dtype=dtype)
            self.pos_embed = ops.Embedding(cfg.num_position_embeddings, d, device=device, dtype=dtype)
            self.blocks = nn.ModuleList(VisionBlock(cfg, ops, device, dtype) for _ in range(cfg.depth))
        u = cfg.merge_unit
        for level in range(cfg.levels):
            if encoder:
                setattr(self, _level_name("input", level),
                        ProjMLP(d, cfg.bsq_hidden_dim, cfg.bsq_dim, d, ops, device, dtype))
            setattr(self, _level_name("output", level),
                    ProjMLP(cfg.bsq_dim, cfg.bsq_hidden_dim, d, cfg.bsq_dim, ops, device, dtype))
        # main merger: per-patch LayerNorm then concat (bsq_skip_final_layernorm) or post-shuffle norm
        main_norm = d if cfg.bsq_skip_final_layernorm else d * u
        self.merger = ProjMLP(d * u, d * u, out_hidden, main_norm, ops, device, dtype)
        self.deepstack_merger_list = nn.ModuleList(
            ProjMLP(d * u, d * u, out_hidden, d * u, ops, device, dtype) for _ in cfg.deepstack_visual_indexes
        )

    # ------------------------------------------------------------------ encoder
    def _pos_embed(self, grid_thw: list[tuple[int, int, int]], device) -> torch.Tensor:
        n = self.cfg.num_grid_per_side
        m = self.cfg.spatial_merge_size
        w_pe = self.pos_embed.weight
        outs = []
        for t, h, w in grid_thw:
            hi = torch.linspace(0, n - 1, h)
            wi = torch.linspace(0, n - 1, w)
            hf, wf = hi.int(), wi.int()
            hc, wc = (hf + 1).clip(max=n - 1), (wf + 1).clip(max=n - 1)
            dh, dw = hi - hf, wi - wf
            idx = torch.stack([
                (hf[:, None] * n + wf[None]).flatten(), (hf[:, None] * n + wc[None]).flatten(),
                (hc[:, None] * n + wf[None]).flatten(), (hc[:, None] * n + wc[None]).flatten(),
            ]).to(device)
            wts = torch.stack([
                ((1 - dh)[:, None] * (1 - dw)[None]).flatten(), ((1 - dh)[:, None] * dw[None]).flatten(),
                (dh[:, None] * (1 - dw)[None]).flatten(), (dh[:, None] * dw[None]).flatten(),
            ]).to(device=device, dtype=w_pe.dtype)
            pe = self.pos_embed(idx) * wts[:, :, None]
            pe = pe[0] + pe[1] + pe[2] + pe[3]
            pe = pe.repeat(t, 1).view(t, h // m, m, w // m, m, -1).permute(0, 1, 3, 2, 4, 5).flatten(0, 4)
            outs.append(pe)
        return torch.cat(outs)

    def _rotary(self, grid_thw, device):
        hd = self.cfg.hidden_size // self.cfg.num_heads
        dim = hd // 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        m = self.cfg.spatial_merge_size
        coords = []
        for t, h, w in grid_thw:
            r = (torch.arange(h // m, device=device)[:, None, None, None] * m
                 + torch.arange(m, device=device)[None, None, :, None]).expand(h // m, w // m, m, m).reshape(-1)
            c = (torch.arange(w // m, device=device)[None, :, None, None] * m
                 + torch.arange(m, device=device)[None, None, None, :]).expand(h // m, w // m, m, m).reshape(-1)
            coords.append(torch.stack((r, c), -1).repeat(t, 1))
        coords = torch.cat(coords)
        max_hw = max(max(h, w) for _, h, w in grid_thw)
        table = torch.outer(torch.arange(max_hw, device=device, dtype=torch.float), inv)
        emb = table[coords].flatten(1)
        emb = torch.cat((emb, emb), dim=-1)
        return emb.cos(), emb.sin()

    def encode_bits(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]], backend="sdpa") -> torch.Tensor:
        """Processor patches (num_patches, C*T*P*P) -> BSQ bits (num_patches / merge_unit, levels, merge_unit, d).

        The bits are the reference's *effective* codes: index -> ``indexes_to_codes`` (64-bit quirk included)."""
        if not self.has_encoder:
            raise RuntimeError("the vision encoder was not loaded (component 'vision')")
        cfg = self.cfg
        proj = self.patch_embed.proj
        x = pixel_values.view(-1, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        x = proj(x.to(proj.weight.dtype)).view(-1, cfg.hidden_size)
        x = x + self._pos_embed(grid_thw, x.device)
        cos, sin = self._rotary(grid_thw, x.device)
        lengths = [t * h * w for t, h, w in grid_thw]
        states = []
        for j, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, lengths, backend)
            if j in cfg.deepstack_visual_indexes:
                states.append(x)
        levels = [x] + states
        bits = []
        for lv, h in enumerate(levels):
            z = getattr(self, _level_name("input", lv))(h)
            z = F.normalize(z, dim=-1)
            # Reference quantizer: zq = z + (sign(z) - z) in floating point, then int64 truncation; a positive
            # z whose sum rounds below 1.0 yields bit 0, so emulate the arithmetic instead of using z > 0.
            one = torch.ones((), dtype=z.dtype, device=z.device)
            zhat = torch.where(z > 0, one, -one)
            zq = z + (zhat - z)
            b = torch.div(zq.to(torch.int64) + 1, 2, rounding_mode="floor")
            idx = bsq.bits_to_indices(b)
            bits.append(bsq.indices_to_bits(idx, cfg.bsq_dim))
        out = torch.stack(bits, dim=1)  # (num_patches, levels, d)
        n = out.shape[0] // cfg.merge_unit
        return out.view(n, cfg.merge_unit, cfg.levels, cfg.bsq_dim).transpose(1, 2).contiguous()

    # ------------------------------------------------------------------ codes -> features
    def bits_to_features(self, bits: torch.Tensor, for_llm: bool = True):
        """bits (..., levels, merge_unit, d) -> LLM features: main (M, out_hidden) and a list of DeepStack
        features (M, out_hidden), exactly ``bsq_indices_to_features(..., with_merger=True)``."""
        cfg = self.cfg
        bits = bits.reshape(-1, cfg.levels, cfg.merge_unit, cfg.bsq_dim)
        w = self.bsq_output_proj.linear_fc1.weight
        codes = bsq.bits_to_codes(bits, cfg.bsq_dim, w.dtype)
        main = None
        deep = []
        for lv in range(cfg.levels):
            hs = getattr(self, _level_name("output", lv))(codes[:, lv])
            if lv == 0:
                main = self.merger(hs)
            else:
                if cfg.bsq_skip_final_layernorm:
                    hs = self.merger.norm(hs)
                deep.append(self.deepstack_merger_list[lv - 1](hs))
        return main, deep
