"""The UniAR image-decoder DiT: SD3.5's MMDiT plus UniAR's SigLIP/BSQ feature injection, as plain modules built
from a layer namespace (``ops``: torch.nn, or ``comfy.ops`` inside ComfyUI, so ComfyUI can stream and cast every
Linear / Conv2d like the AR model's; quantised Linears from :mod:`uniar_backend.quant` replace them the same way).

The parameter names are diffusers' ``SD3Transformer2DModel`` names plus upstream's ``siglip_embed_add_latent``
(``SD3Transformer2DModelWithSigLIP``), so the checkpoint's ``sd3_transformer/diffusion_pytorch_model.safetensors``
loads as it is, and the computation is diffusers' op for op (the parity tests compare against diffusers' own
module and the goldens).  Upstream adds one module: ``siglip_embed_add_latent`` = Linear(levels * vision_hidden ->
inner_dim, no bias).  The token features (``siglip_tensor``, raster order over the 16-px patch grid of the AR
image) are multiplied by ``image_token_scale_factor``, resampled bicubically to the latent patch grid
(``super_resolution``), projected and added to the patch + position embedded latent tokens before the first
block.  The training-only / LoRA / ControlNet / IP-adapter branches of diffusers are not reproduced.

The DiT reads its ``attention`` attribute (sdpa / eager / flash_attention_2).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.layers import attention as attention_core
from ..modeling.layers import resolve_ops

# Keys of ``sd3_transformer/config.json`` that describe the stock SD3 MMDiT (with their defaults).
BASE_KEYS = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
    "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": None,
    "pooled_projection_dim": 2048, "out_channels": None, "pos_embed_max_size": 96, "dual_attention_layers": (),
    "qk_norm": None,
}
EPS = 1e-6


def _modulate(x, scale, shift):
    return x * (1 + scale[:, None]) + shift[:, None]


class _RMSNorm(nn.Module):
    """diffusers' ``RMSNorm`` (q / k norms): variance in float32, the weight applied in its own dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + EPS)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class _AdaNormZero(nn.Module):
    """``AdaLayerNormZero`` (6 modulations) / ``SD35AdaLayerNormZeroX`` (9: a second attention branch)."""

    def __init__(self, dim: int, n: int, ops):
        super().__init__()
        self.n = n
        self.linear = ops.Linear(dim, n * dim, bias=True)

    def forward(self, x, emb):
        mods = self.linear(F.silu(emb)).chunk(self.n, dim=1)
        h = F.layer_norm(x, (x.shape[-1],), eps=EPS)
        if self.n == 6:
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods
            return _modulate(h, scale, shift), gate, shift_mlp, scale_mlp, gate_mlp, None, None
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = mods
        return _modulate(h, scale, shift), gate, shift_mlp, scale_mlp, gate_mlp, _modulate(h, scale2, shift2), gate2


class _AdaNormContinuous(nn.Module):
    """``AdaLayerNormContinuous`` (layer norm without affine, eps 1e-6): the last block's context and ``norm_out``."""

    def __init__(self, dim: int, ops):
        super().__init__()
        self.linear = ops.Linear(dim, 2 * dim, bias=True)

    def forward(self, x, emb):
        scale, shift = self.linear(F.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale)[:, None, :] + shift[:, None, :]


class _Attention(nn.Module):
    """SD3's joint attention (``added_kv``: the context stream's projections) or the plain second attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, ops, added_kv: bool,
                 context_pre_only: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (ops.Linear(dim, inner, bias=True) for _ in range(3))
        norm = (lambda: _RMSNorm(head_dim)) if qk_norm == "rms_norm" else (lambda: None)
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = nn.ModuleList([ops.Linear(inner, dim, bias=True)])
        self.added_kv = added_kv
        self.context_pre_only = context_pre_only
        if added_kv:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (ops.Linear(dim, inner, bias=True) for _ in range(3))
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_add_out = None if context_pre_only else ops.Linear(inner, dim, bias=True)

    def _heads(self, t, b):
        return t.view(b, -1, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None, backend: str = "sdpa"):
        b, n = x.shape[:2]
        q, k, v = self._heads(self.to_q(x), b), self._heads(self.to_k(x), b), self._heads(self.to_v(x), b)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if context is not None:
            cq, ck = self._heads(self.add_q_proj(context), b), self._heads(self.add_k_proj(context), b)
            cv = self._heads(self.add_v_proj(context), b)
            if self.norm_added_q is not None:
                cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = attention_core(q, k, v, None, backend, 1 / math.sqrt(self.head_dim)).to(q.dtype)
        if context is None:
            return self.to_out[0](out), None
        out, ctx = out[:, :n], out[:, n:]
        if self.to_add_out is not None:
            ctx = self.to_add_out(ctx)
        return self.to_out[0](out), ctx


class _GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int, ops):
        super().__init__()
        self.proj = ops.Linear(dim, inner, bias=True)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    """diffusers' ``FeedForward(activation_fn="gelu-approximate")``: keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, ops):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, 4 * dim, ops), nn.Identity(), ops.Linear(4 * dim, dim, bias=True)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class _JointBlock(nn.Module):
    """``JointTransformerBlock``: joint attention over (image, context), an optional second image-only attention
    (SD3.5's dual-attention layers), the two feed-forwards; the last block only reads the context."""

    def __init__(self, dim, heads, head_dim, qk_norm, ops, context_pre_only: bool, dual: bool):
        super().__init__()
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = _AdaNormZero(dim, 9 if dual else 6, ops)
        self.norm1_context = _AdaNormContinuous(dim, ops) if context_pre_only else _AdaNormZero(dim, 6, ops)
        self.attn = _Attention(dim, heads, head_dim, qk_norm, ops, added_kv=True, context_pre_only=context_pre_only)
        self.attn2 = _Attention(dim, heads, head_dim, qk_norm, ops, added_kv=False) if dual else None
        self.ff = _FeedForward(dim, ops)
        self.ff_context = None if context_pre_only else _FeedForward(dim, ops)

    def forward(self, x, context, temb, backend):
        h, gate, shift_mlp, scale_mlp, gate_mlp, h2, gate2 = self.norm1(x, temb)
        if self.context_pre_only:
            c = self.norm1_context(context, temb)
        else:
            c, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp, _, _ = self.norm1_context(context, temb)
        attn, ctx_attn = self.attn(h, c, backend)
        x = x + gate.unsqueeze(1) * attn
        if self.dual:
            x = x + gate2.unsqueeze(1) * self.attn2(h2, None, backend)[0]
        h = _modulate(F.layer_norm(x, (x.shape[-1],), eps=EPS), scale_mlp, shift_mlp)
        x = x + gate_mlp.unsqueeze(1) * self.ff(h)
        if self.context_pre_only:
            return None, x
        context = context + c_gate.unsqueeze(1) * ctx_attn
        c = _modulate(F.layer_norm(context, (context.shape[-1],), eps=EPS), c_scale_mlp, c_shift_mlp)
        return context + c_gate_mlp.unsqueeze(1) * self.ff_context(c), x


class _PatchEmbed(nn.Module):
    """The latent's patches (``proj``, a strided Conv2d) plus the fixed sin-cos table ``pos_embed``
    (``pos_embed_max_size``^2 positions; the center crop of the latent's grid is added)."""

    def __init__(self, cfg: dict, dim: int, ops):
        super().__init__()
        p, m = cfg["patch_size"], cfg["pos_embed_max_size"]
        self.patch_size, self.pos_embed_max_size = p, m
        self.proj = ops.Conv2d(cfg["in_channels"], dim, kernel_size=(p, p), stride=p, bias=True)
        table = torch.empty(1, m * m, dim)
        if table.device.type != "meta":  # a model built with weights (benchmarks): the table diffusers computes
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            base = cfg["sample_size"] // p
            table = get_2d_sincos_pos_embed(dim, m, base_size=base, interpolation_scale=1, output_type="pt")
            table = table.float().unsqueeze(0)
        self.register_buffer("pos_embed", table, persistent=True)


class _TimeTextEmbed(nn.Module):
    """``CombinedTimestepTextProjEmbeddings``: sinusoidal timestep (256, cos first) -> MLP, plus the pooled prompt
    -> MLP."""

    def __init__(self, dim: int, pooled: int, ops):
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = ops.Linear(256, dim, bias=True)
        self.timestep_embedder.linear_2 = ops.Linear(dim, dim, bias=True)
        self.text_embedder = nn.Module()
        self.text_embedder.linear_1 = ops.Linear(pooled, dim, bias=True)
        self.text_embedder.linear_2 = ops.Linear(dim, dim, bias=True)

    @staticmethod
    def sinusoid(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
        half = channels // 2
        exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
        emb = t[:, None].float() * torch.exp(exponent)[None, :]
        return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)

    def timestep_part(self, timestep, dtype):
        te = self.timestep_embedder
        return te.linear_2(F.silu(te.linear_1(self.sinusoid(timestep).to(dtype))))

    def text_part(self, pooled):
        tx = self.text_embedder
        return tx.linear_2(F.silu(tx.linear_1(pooled)))

    def forward(self, timestep, pooled):
        return self.timestep_part(timestep, pooled.dtype) + self.text_part(pooled)


class UniARSD3Transformer(nn.Module):
    """SD3.5 MMDiT with UniAR's additive token-feature conditioning, built from ``ops``.  Build with
    :meth:`from_uniar_config` (the ``sd3_transformer/config.json`` dict)."""

    def __init__(self, cfg: dict, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        c = {k: cfg.get(k, v) for k, v in BASE_KEYS.items()}
        c["out_channels"] = c["out_channels"] or c["in_channels"]
        c["dual_attention_layers"] = tuple(c["dual_attention_layers"] or ())
        if c["qk_norm"] not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {c['qk_norm']!r} is not supported (SD3.5 uses rms_norm)")
        dim = c["num_attention_heads"] * c["attention_head_dim"]
        c["caption_projection_dim"] = c["caption_projection_dim"] or dim
        self.config = SimpleNamespace(**c)
        self.inner_dim, self.out_channels = dim, c["out_channels"]
        self.siglip_channels = int(cfg["siglip_channels"])
        self.image_token_scale_factor = float(cfg.get("image_token_scale_factor", 1.0))
        self.super_resolution = bool(cfg.get("super_resolution", False))
        self.attention = "sdpa"
        self.pos_embed = _PatchEmbed(c, dim, ops)
        self.time_text_embed = _TimeTextEmbed(dim, c["pooled_projection_dim"], ops)
        self.context_embedder = ops.Linear(c["joint_attention_dim"], c["caption_projection_dim"], bias=True)
        n = c["num_layers"]
        self.transformer_blocks = nn.ModuleList(
            _JointBlock(dim, c["num_attention_heads"], c["attention_head_dim"], c["qk_norm"], ops,
                        context_pre_only=i == n - 1, dual=i in c["dual_attention_layers"])
            for i in range(n))
        self.norm_out = _AdaNormContinuous(dim, ops)
        self.proj_out = ops.Linear(dim, c["patch_size"] ** 2 * self.out_channels, bias=True)
        self.siglip_embed_add_latent = ops.Linear(self.siglip_channels, dim, bias=False)

    @classmethod
    def from_uniar_config(cls, cfg: dict, ops=None) -> "UniARSD3Transformer":
        return cls(cfg, ops)

    # ------------------------------------------------------------------ token features
    def embed_token_features(self, siglip_tensor: torch.Tensor, latent_grid: tuple[int, int],
                             token_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``siglip_tensor`` (B, gh*gw, C) -> (B, latent_grid tokens, inner_dim) to add to the latent tokens.

        ``token_grid`` is the (gh, gw) patch grid of the AR image.  Deviation from upstream (documented in
        docs/decoder.md): upstream does not know the grid; it uses ``latent_grid`` when the areas agree and
        otherwise assumes a square grid ``int(sqrt(gh*gw))``, which fails for non-square AR images with an
        upsampling ratio != 1 (golden d3).  Given ``token_grid`` we resample on the true grid; for square grids
        and for ratio 1 this is exactly what upstream computes.  Without ``token_grid`` upstream's rule is used.
        """
        x = siglip_tensor * self.image_token_scale_factor
        if self.super_resolution:
            b, n, c = x.shape
            if token_grid is None:  # upstream's guess
                token_grid = latent_grid if latent_grid[0] * latent_grid[1] == n else (int(n**0.5),) * 2
            gh, gw = token_grid
            x = x.reshape(b, gh, gw, c).permute(0, 3, 1, 2)
            # Always interpolated, as upstream (bicubic at the same size is the identity).
            x = F.interpolate(x, size=latent_grid, mode="bicubic", align_corners=False)
            x = x.permute(0, 2, 3, 1).reshape(b, -1, c)
        return self.siglip_embed_add_latent(x)

    # ------------------------------------------------------------------ positions
    def compact_positions(self) -> bool:
        """Keep the fixed 2-D sin-cos table (``pos_embed.pos_embed``: 384 x 384 positions x 1536 = 226 M values,
        0.42 GiB in bf16) as its two 1-D factors when it is separable -- the first half of the channels a function
        of one grid axis, the second half of the other, as diffusers builds it.  Checked on the loaded values,
        bitwise; a table that is not separable is kept whole.  The cropped table is then the same values as
        diffusers' ``cropped_pos_embed``, so the output is bitwise unchanged.  -> whether it was compacted."""
        pe = self.pos_embed
        table = getattr(pe, "pos_embed", None)
        if table is None or table.device.type == "meta":
            return False
        m = pe.pos_embed_max_size
        t = table.reshape(m, m, -1)
        half = t.shape[-1] // 2
        factors = []
        for part in (t[..., :half], t[..., half:]):
            by_col, by_row = part[0], part[:, 0]  # (m, half): a function of the column / of the row
            if all(torch.equal(part[i], by_col) for i in range(m)):
                factors.append(("col", by_col.clone()))
            elif all(torch.equal(part[:, j], by_row) for j in range(m)):
                factors.append(("row", by_row.clone()))
            else:
                return False
        self._pos_axes = tuple(a for a, _ in factors)
        del pe._buffers["pos_embed"]
        pe.pos_embed = None
        self.register_buffer("pos_factor_a", factors[0][1], persistent=False)
        self.register_buffer("pos_factor_b", factors[1][1], persistent=False)
        return True

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, inner_dim): the center crop of the table for an h x w patch grid (diffusers' crop)."""
        pe = self.pos_embed
        m = pe.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"latent grid {h}x{w} exceeds pos_embed_max_size {m}")
        top, left = (m - h) // 2, (m - w) // 2
        if getattr(self, "pos_factor_a", None) is None:
            t = pe.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w, :]
            return t.reshape(1, h * w, -1)
        parts = []
        for axis, f in zip(self._pos_axes, (self.pos_factor_a, self.pos_factor_b)):
            if axis == "col":
                parts.append(f[left:left + w].unsqueeze(0).expand(h, w, -1))
            else:
                parts.append(f[top:top + h].unsqueeze(1).expand(h, w, -1))
        return torch.cat(parts, dim=-1).reshape(1, h * w, -1)

    def _embed_patches(self, latent: torch.Tensor) -> torch.Tensor:
        p = self.pos_embed.patch_size
        x = self.pos_embed.proj(latent).flatten(2).transpose(1, 2)
        return (x + self._positions(latent.shape[-2] // p, latent.shape[-1] // p)).to(x.dtype)

    # ------------------------------------------------------------------ forward
    def condition(self, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                  siglip_tensor: torch.Tensor | None, latent_grid: tuple[int, int],
                  token_grid: tuple[int, int] | None = None) -> "Condition":
        """What every denoising step reads unchanged, computed once per decode: the projected prompt (context
        stream input), the pooled prompt's part of the time embedding and the token features on the latent grid.
        Steps given it compute exactly what a step computing them itself does (the same ops on the same inputs)."""
        extra = None
        if siglip_tensor is not None:
            extra = self.embed_token_features(siglip_tensor, latent_grid, token_grid)
        return Condition(self.context_embedder(encoder_hidden_states),
                         self.time_text_embed.text_part(pooled_projections), pooled_projections.dtype, extra,
                         latent_grid)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                siglip_tensor: torch.Tensor | None = None, token_grid: tuple[int, int] | None = None,
                condition: "Condition | None" = None):
        """Velocity prediction (B, C, h, w) for latents ``hidden_states`` (B, C, h, w), as a 1-tuple (diffusers'
        ``return_dict=False`` convention).  ``condition`` (from :meth:`condition`) replaces the prompt, pooled
        prompt and token features."""
        height, width = hidden_states.shape[-2:]
        p = self.config.patch_size
        latent_grid = (height // p, width // p)
        if condition is None:
            condition = self.condition(encoder_hidden_states, pooled_projections, siglip_tensor, latent_grid,
                                       token_grid)
        elif condition.latent_grid != latent_grid:
            raise ValueError(f"condition made for a {condition.latent_grid} latent grid, latents give {latent_grid}")
        extra = condition.extra

        x = self._embed_patches(hidden_states).contiguous()  # patchify + cropped sin-cos positions
        temb = self.time_text_embed.timestep_part(timestep, condition.dtype) + condition.pooled
        context = condition.context
        if extra is not None:
            x = x + extra
        for block in self.transformer_blocks:
            context, x = block(x, context, temb, self.attention)

        x = self.proj_out(self.norm_out(x, temb))
        # unpatchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p)
        gh, gw = latent_grid
        x = x.reshape(x.shape[0], gh, gw, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return (x.reshape(x.shape[0], self.out_channels, gh * p, gw * p),)


class Condition:
    """The step-invariant inputs of :meth:`UniARSD3Transformer.forward` (see :meth:`UniARSD3Transformer.condition`)."""

    def __init__(self, context, pooled, dtype, extra, latent_grid):
        self.context, self.pooled, self.dtype, self.extra, self.latent_grid = context, pooled, dtype, extra, latent_grid
