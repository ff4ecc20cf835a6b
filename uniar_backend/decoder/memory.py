"""Parameter counts of the decoder-side modules at the real UniAR sizes (built on the meta device, no weights).

``python -m uniar_backend.decoder.memory`` prints the markdown table used in ``docs/decoder.md``: what each
phase keeps resident, for this implementation and for the reference ``UniARVisualDecoder``.
"""

from __future__ import annotations

import torch

# Real configurations (SD3.5-Medium as published by Stability AI; UniAR's SigLIP2-So400M vision tower).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm",
    siglip_channels=4 * 1152, super_resolution=True, image_token_scale_factor=1.0,
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    norm_num_groups=32, act_fn="silu", down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True, scaling_factor=1.5305, shift_factor=0.0609,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
VISION = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=2304,
              deepstack_visual_indexes=[8, 16, 24], bsq_dim=64, bsq_hidden_dim=8192)


def _count(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in list(module.parameters()) + list(module.buffers()))


def parameter_counts() -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..config import VisionConfig
    from ..modeling.layers import resolve_ops
    from ..modeling.vision import BSQOutputProjections, VisionTower
    from .sd3 import UniARSD3Transformer

    out = {}
    with torch.device("meta"):
        dit = UniARSD3Transformer.from_uniar_config(SD35M_TRANSFORMER)
        out["DiT (SD3.5-M + siglip_embed_add_latent)"] = _count(dit)
        out["VAE (SD3)"] = _count(AutoencoderKL.from_config(SD3_VAE))
        out["CLIP-L text encoder"] = _count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
        out["CLIP-G text encoder"] = _count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
        out["T5-XXL encoder"] = _count(T5EncoderModel(T5Config(**T5_XXL)))
        vcfg = VisionConfig(**VISION)
        out["vision tower (bsq_encoder, whole)"] = _count(VisionTower(vcfg, vcfg.out_hidden_size, resolve_ops()))
        out["bsq_output_proj x4"] = _count(BSQOutputProjections(vcfg, resolve_ops()))
    return out


def _gib(n_params: int, bytes_per: int = 2) -> str:
    return f"{n_params * bytes_per / 2**30:.2f} GiB"


def markdown_table() -> str:
    c = parameter_counts()
    emb = (77 + 256) * 4096 + 2048  # cached prompt_embeds + pooled, one prompt
    rows = ["| module | parameters | bf16 bytes |", "|---|---:|---:|"]
    for k, v in c.items():
        rows.append(f"| {k} | {v / 1e6:,.1f} M | {_gib(v)} |")
    rows.append(f"| cached decoder-prompt embeddings | {emb / 1e6:.2f} M values | {emb * 2 / 2**20:.1f} MiB |")
    dit, vae = c["DiT (SD3.5-M + siglip_embed_add_latent)"], c["VAE (SD3)"]
    clip_l, clip_g, t5 = c["CLIP-L text encoder"], c["CLIP-G text encoder"], c["T5-XXL encoder"]
    tower, proj = c["vision tower (bsq_encoder, whole)"], c["bsq_output_proj x4"]
    phases = [
        ("ours: prompt encoding (once per prompt and text-encoder set; skipped when cached)",
         "one text encoder at a time, largest = T5-XXL", t5),
        ("ours: decoding", "DiT + VAE + bsq_output_proj x4 + cached embeddings", dit + vae + proj + emb),
        ("reference: decoding (every call)", "DiT + VAE + CLIP-L + CLIP-G + T5-XXL + whole vision tower",
         dit + vae + clip_l + clip_g + t5 + tower),
    ]
    rows += ["", "| phase | resident | parameters | bf16 bytes |", "|---|---|---:|---:|"]
    for name, what, n in phases:
        rows.append(f"| {name} | {what} | {n / 1e9:.2f} B | {_gib(n)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
