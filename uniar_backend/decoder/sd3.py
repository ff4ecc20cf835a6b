"""The UniAR image-decoder DiT: diffusers' SD3 MMDiT plus the SigLIP/BSQ feature injection.

This module imports diffusers at import time; :mod:`uniar_backend.decoder` only imports it inside the loading
functions, so importing the package stays light.

Upstream (``SD3Transformer2DModelWithSigLIP``) adds one module to ``SD3Transformer2DModel``:
``siglip_embed_add_latent`` = Linear(levels * vision_hidden -> inner_dim, no bias).  The token features
(``siglip_tensor``, raster order over the 16-px patch grid of the AR image) are multiplied by
``image_token_scale_factor``, resampled bicubically to the latent patch grid (``super_resolution``), projected and
added to the patch + position embedded latent tokens before the first block.  Everything else is the stock
SD3.5 forward, reproduced here without the training-only / LoRA / ControlNet / IP-adapter branches.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention

from ..modeling.layers import attention as attention_core

# Keys of ``sd3_transformer/config.json`` that belong to stock SD3Transformer2DModel.__init__.
BASE_KEYS = (
    "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
    "pos_embed_max_size", "dual_attention_layers", "qk_norm",
)


class UniARSD3Transformer(SD3Transformer2DModel):
    """SD3.5 MMDiT with UniAR's additive token-feature conditioning (same parameter names as upstream, so the
    checkpoint's ``diffusion_pytorch_model.safetensors`` loads as it is).

    Build with :meth:`from_uniar_config`; the extra settings are plain attributes (they are not part of the
    diffusers config of the base class)."""

    @classmethod
    def from_uniar_config(cls, cfg: dict) -> "UniARSD3Transformer":
        base = {k: cfg[k] for k in BASE_KEYS if k in cfg}
        if "dual_attention_layers" in base:
            base["dual_attention_layers"] = tuple(base["dual_attention_layers"])
        model = cls(**base)
        model.siglip_channels = int(cfg["siglip_channels"])
        model.image_token_scale_factor = float(cfg.get("image_token_scale_factor", 1.0))
        model.super_resolution = bool(cfg.get("super_resolution", False))
        model.siglip_embed_add_latent = nn.Linear(model.siglip_channels, model.inner_dim, bias=False)
        return model

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
        if table is None or not pe.pos_embed_max_size or pe.layer_norm or not pe.flatten or table.device.type == "meta":
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

    def _embed_patches(self, latent: torch.Tensor) -> torch.Tensor:
        pe = self.pos_embed
        if getattr(self, "pos_factor_a", None) is None:
            return pe(latent)
        p, m = pe.patch_size, pe.pos_embed_max_size
        h, w = latent.shape[-2] // p, latent.shape[-1] // p
        if h > m or w > m:
            raise ValueError(f"latent grid {h}x{w} exceeds pos_embed_max_size {m}")
        top, left = (m - h) // 2, (m - w) // 2
        x = pe.proj(latent).flatten(2).transpose(1, 2)
        parts = []
        for axis, f in zip(self._pos_axes, (self.pos_factor_a, self.pos_factor_b)):
            if axis == "col":
                parts.append(f[left:left + w].unsqueeze(0).expand(h, w, -1))
            else:
                parts.append(f[top:top + h].unsqueeze(1).expand(h, w, -1))
        pos = torch.cat(parts, dim=-1).reshape(1, h * w, -1)
        return (x + pos).to(x.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor,
                siglip_tensor: torch.Tensor | None = None, token_grid: tuple[int, int] | None = None,
                return_dict: bool = False):
        """Velocity prediction (B, C, h, w) for latents ``hidden_states`` (B, C, h, w).  Returns a 1-tuple unless
        ``return_dict`` (diffusers convention)."""
        height, width = hidden_states.shape[-2:]
        p = self.config.patch_size
        latent_grid = (height // p, width // p)
        extra = None
        if siglip_tensor is not None:
            extra = self.embed_token_features(siglip_tensor, latent_grid, token_grid)

        hidden_states = self._embed_patches(hidden_states).contiguous()  # patchify + cropped sin-cos positions
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        if extra is not None:
            hidden_states = hidden_states + extra

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                joint_attention_kwargs=None,
            )

        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        # unpatchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p)
        gh, gw = latent_grid
        hidden_states = hidden_states.reshape(hidden_states.shape[0], gh, gw, p, p, self.out_channels)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        out = hidden_states.reshape(hidden_states.shape[0], self.out_channels, gh * p, gw * p)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


# ---------------------------------------------------------------------------------------------- attention
class JointAttentionProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3 joint and dual attention) with a selectable attention kernel.

    Only used for ``eager`` and ``flash_attention_2``; ``sdpa`` keeps diffusers' own processor, i.e. exactly what
    the reference runs."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        b, n = hidden_states.shape[:2]
        heads = attn.heads

        def split(t):
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = split(attn.add_q_proj(encoder_hidden_states))
            ck = split(attn.add_k_proj(encoder_hidden_states))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        head_dim = q.shape[-1]
        out = attention_core(q, k, v, None, self.backend, head_dim**-0.5, causal=False).to(q.dtype)
        if encoder_hidden_states is not None:
            out, ctx = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out


def set_attention(module: nn.Module, backend: str, vae: bool = False) -> None:
    """Install the attention kernel ``backend`` (sdpa / eager / flash_attention_2) in every diffusers
    ``Attention`` of ``module``.

    DiT: sdpa = diffusers' ``JointAttnProcessor2_0`` (the reference), eager / flash = :class:`JointAttentionProcessor`.
    VAE (one 512-wide head in the mid block, which flash-attn cannot run): eager = diffusers' ``AttnProcessor``,
    everything else = ``AttnProcessor2_0`` (sdpa)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0

    for m in module.modules():
        if not isinstance(m, Attention):
            continue
        if vae:
            m.set_processor(AttnProcessor() if backend == "eager" else AttnProcessor2_0())
        elif backend == "sdpa":
            m.set_processor(JointAttnProcessor2_0())
        else:
            m.set_processor(JointAttentionProcessor(backend))
