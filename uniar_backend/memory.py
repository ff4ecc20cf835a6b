"""``python -m uniar_backend memory --format {bf16,fp8,int8,int4} [--json]``: bytes per part of the real UniAR
model and the peak memory of the two workloads, per weight format, computed from the real configurations on the
meta device (no weights, no allocation).

Parts (``components``): ``llm`` (embeddings, the 36 decoder layers, final norm), ``lm_head``, ``vision`` (the
whole SigLIP2 tower with its mergers and the AR side's BSQ projections), ``gen_head`` (``visual_decoder`` stack +
``output_layer_vistok``), ``dit`` (SD3.5-M + UniAR's feature input; its fixed sin-cos position table as the two
1-D factors the loader keeps), ``vae`` (SD3's, the decoding half the pack loads), ``bsq_projections`` (the
decoder's ``bsq_output_proj`` x4).  Quantised formats store the Linears :mod:`uniar_backend.quant` names; the rest
is bfloat16.

Peaks (``peak_bytes``), phases sequential as the pack runs them (the AR model is released, or evicted by ComfyUI,
before the decoder runs):

* ``t2i_1024``: AR at 960x960 (900 tokens), CFG (2 rows), a 128-position prompt, weights of ``llm`` + ``gen_head``
  + the vision tower's codebook side, both KV caches at full length, the prefill's activations; then the decode
  to 1024x1024 with CFG: DiT + VAE + BSQ projections + cached prompt embeddings + the larger of the DiT's and the
  VAE decoder's activations.
* ``caption``: a 1024x1024 image (4096 patches, 1024 merged tokens) + a 64-token question, 512 new tokens, one
  row: ``llm`` + ``vision`` + ``lm_head``, the KV cache, and the larger of the vision tower's and the prefill's
  activations.

Activations are estimates of the largest tensors alive at once (written out below, memory-efficient attention as
sdpa / flash use on CUDA); the weights and caches are exact.
"""

from __future__ import annotations

import torch

GIB = 1 << 30
BF16 = 2


def _bytes(module: torch.nn.Module) -> int:
    """Resident bytes of a module built on the meta device: stored dtypes for quantised tensors, bfloat16 for the
    rest (floating tensors), the tensor's own size otherwise."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = t.element_size() if (getattr(t, "uniar_stored", False) or not t.is_floating_point()) else BF16
        total += t.numel() * size
    return total


def _ar(fmt):
    from .modeling.uniar import COMPONENTS, UniARModel
    from .quant.layers import AR_TARGETS, quantize_modules
    from .tools.synthetic import real_config

    cfg = real_config()
    with torch.device("meta"):
        full = UniARModel(cfg, COMPONENTS, dtype=torch.bfloat16)
        t2i = UniARModel(cfg, ("llm", "gen_head"), dtype=torch.bfloat16)
        for m in (full, t2i):
            if fmt is not None:
                quantize_modules(m, AR_TARGETS, fmt, torch.bfloat16)
    return cfg, full, t2i


def _decoder(fmt):
    from .config import VisionConfig
    from .decoder.memory import SD3_VAE, SD35M_TRANSFORMER, VISION
    from .decoder.sd3 import UniARSD3Transformer
    from .decoder.vae import VAEDecoder
    from .modeling.layers import resolve_ops
    from .modeling.vision import BSQOutputProjections
    from .quant.layers import DIT_TARGETS, quantize_modules

    with torch.device("meta"):
        dit = UniARSD3Transformer.from_uniar_config(SD35M_TRANSFORMER)
        if fmt is not None:
            quantize_modules(dit, DIT_TARGETS, fmt, torch.bfloat16)
        vae = VAEDecoder(SD3_VAE)
        bsq = BSQOutputProjections(VisionConfig(**VISION), resolve_ops())
    return dit, vae, bsq


def report(format: str = "bf16") -> dict:
    from .quant import check_format
    from .quant.formats import get

    fmt = None if format == "bf16" else get(check_format(format))
    cfg, full, t2i = _ar(fmt)
    dit, vae, bsq = _decoder(fmt)
    tc = cfg.text
    lm = full.model.language_model
    # the DiT's fixed sin-cos table is kept as its two 1-D factors (UniARSD3Transformer.compact_positions)
    table = dit.pos_embed.pos_embed
    m = dit.pos_embed.pos_embed_max_size
    dit_bytes = _bytes(dit) - table.numel() * BF16 + 2 * m * (table.shape[-1] // 2) * BF16
    comp = {
        "llm": _bytes(lm),
        "lm_head": _bytes(full.lm_head),
        "vision": _bytes(full.model.visual),
        "gen_head": _bytes(full.visual_decoder) + _bytes(full.output_layer_vistok),
        "dit": dit_bytes,
        "vae": _bytes(vae),
        "bsq_projections": _bytes(bsq),
    }

    # ---- t2i_1024: AR phase
    rows, prompt, n_tok = 2, 128, (960 // 32) ** 2
    layers = tc.num_hidden_layers + cfg.visual_transformer_decoder_depth
    kv = 2 * layers * rows * tc.num_key_value_heads * tc.head_dim * (prompt + n_tok) * BF16
    d, inter = tc.hidden_size, tc.intermediate_size
    prefill = rows * prompt * (4 * d + 3 * inter) * BF16  # hidden + residual + q/k/v/o-sized + the MLP's 3 inter
    ar_weights = _bytes(t2i)
    ar_phase = ar_weights + kv + prefill
    # ---- t2i_1024: decode phase (1024x1024: latent 128x128 -> 64x64 = 4096 DiT tokens; 333 prompt tokens)
    t_img, t_txt, width = (1024 // 16) ** 2, 77 + 256, 1536
    seq = rows * (t_img + t_txt)
    dit_act = seq * width * BF16 * 12  # q/k/v, attention out, residuals, the 4x-wide MLP hidden (4) + dual attn
    # VAE decoder at full resolution: 128 channels x 1024^2, ~4 such tensors alive (input, GroupNorm, conv, skip)
    vae_act = 4 * 128 * 1024 * 1024 * BF16
    emb = (t_txt * 4096 + 2048) * BF16
    decode_phase = comp["dit"] + comp["vae"] + comp["bsq_projections"] + emb + max(dit_act, vae_act)
    # ---- caption: a 1024x1024 image, 64-token question, 512 new tokens, one row
    patches, merged, q_len, new = (1024 // 16) ** 2, (1024 // 32) ** 2, 64, 512
    vc = cfg.vision
    vis_act = patches * (4 * vc.hidden_size + 2 * vc.intermediate_size) * BF16
    ctx = merged + q_len + 32
    cap_kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * (ctx + new) * BF16
    cap_prefill = ctx * (4 * d + 3 * inter) * BF16 + ctx * tc.vocab_size * 4 // ctx  # + one row of logits
    caption = comp["llm"] + comp["vision"] + comp["lm_head"] + cap_kv + max(vis_act, cap_prefill)
    return {
        "format": format,
        "components": comp,
        "peak_bytes": {"t2i_1024": max(ar_phase, decode_phase), "caption": caption},
        "phases": {"t2i_1024_ar": ar_phase, "t2i_1024_decode": decode_phase, "kv_cache_t2i": kv},
        "gib": {k: round(v / GIB, 2) for k, v in {**comp, "llm+gen_head": comp["llm"] + comp["gen_head"],
                                                  "t2i_1024": max(ar_phase, decode_phase),
                                                  "caption": caption}.items()},
    }


def markdown(r: dict) -> str:
    rows = [f"| part ({r['format']}) | GiB |", "|---|---:|"]
    rows += [f"| {k} | {v:.2f} |" for k, v in r["gib"].items()]
    return "\n".join(rows)
