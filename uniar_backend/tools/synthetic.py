"""Random-weight UniAR models without any files (benchmarks, tests) and synthetic checkpoint folders.

* :func:`make_config` builds a :class:`~uniar_backend.config.UniARConfig` in code.  The dict it is made from is a
  real ``config.json`` (``model_type`` "uniar", ``text_config`` / ``vision_config``) and goes through the same
  parser as a checkpoint's, so a synthetic config can never disagree with what the loader accepts.
* :func:`random_model` builds a :class:`~uniar_backend.modeling.uniar.UniARModel` and fills it deterministically,
  scaled like the tiny fixtures: Linear / Conv weights ``N(0, 1) / sqrt(fan_in)`` (gain 4 for ``lm_head`` and
  the last Linear of the vistok head, so per-bit logit margins are several units), biases ``N(0, 0.02^2)``,
  RMSNorm / LayerNorm weights ``1 + N(0, 0.1^2)``, LayerNorm biases ``N(0, 0.05^2)``, token embeddings
  ``N(0, 1)``, the vision position table ``N(0, 0.5^2)``.  Every tensor has its own generator seeded from
  ``(seed, checkpoint key)``, so a key's values do not depend on which components are built.  The tensors are
  drawn on ``device`` (a CUDA model at the real size is created on the GPU without a host copy); the values
  are reproducible per device type.
* :func:`write_checkpoint` writes a complete AR checkpoint folder in the real layout (``config.json``,
  ``model.safetensors`` or ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``,
  ``bsq_encoder/``, and the tokenizer / processor / generation files copied from a source folder).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import zlib
from typing import Iterable

import torch

from .. import bsq
from ..config import UniARConfig
from ..modeling.uniar import COMPONENTS, UniARModel

# Files of an AR checkpoint folder that are not weights (copied from the source folder when present).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "generation_config.json",
)

HEAD_VARIANTS = ("layernorm", "linear", "mlp")


# ---------------------------------------------------------------------------------------------- configs
def config_dict(hidden: int = 64, layers: int = 4, stack_depth: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 16, intermediate: int | None = None, vocab: int = 704, bsq_dim: int = 64,
                mrope_section: Iterable[int] | None = None, rope_theta: float = 5e6, rms_norm_eps: float = 1e-6,
                vision: dict | None = None, head_variant: str = "layernorm", image_token_id: int = 650,
                video_token_id: int = 651, vision_start_token_id: int = 647, vision_end_token_id: int = 648,
                max_position_embeddings: int = 262144, dtype: str = "float32") -> dict:
    """A UniAR ``config.json`` as a dict.  Defaults are the tiny fixture's (``uniar-tiny-bsq64``); the special
    token ids match the fixture tokenizer, so a checkpoint written with them works with the copied tokenizer.

    ``vision`` overrides vision_config fields (e.g. ``{"hidden_size": 64, "bsq_hidden_dim": 512}``).
    ``mrope_section`` defaults to a split of ``head_dim / 2`` close to Qwen3-VL's 24:20:20."""
    if head_variant not in HEAD_VARIANTS:
        raise ValueError(f"head_variant must be one of {HEAD_VARIANTS}, got {head_variant!r}")
    if head_dim % 2:
        raise ValueError("head_dim must be even")
    if mrope_section is None:
        half = head_dim // 2
        hw = (half * 20) // 64
        mrope_section = [half - 2 * hw, hw, hw]
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 638, "dtype": dtype,
        "eos_token_id": 640, "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate if intermediate is not None else 2 * hidden,
        "max_position_embeddings": max_position_embeddings, "model_type": "qwen3_vl_text",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(mrope_section), "rope_type": "default"},
        "rope_theta": rope_theta, "use_cache": True, "vocab_size": vocab,
    }
    vis = {
        "bsq_dim": bsq_dim, "bsq_hidden_dim": 64, "bsq_skip_final_layernorm": True,
        "deepstack_visual_indexes": [0, 1, 2], "depth": 4, "dtype": dtype, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64,
        "model_type": "uniar_vision", "num_heads": 2, "num_position_embeddings": 2304, "out_hidden_size": hidden,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "use_bsq": True,
        "vistok_pred": False, "vistok_pred_layernorm": False, "vistok_pred_transformer_head": False,
    }
    vis.update(vision or {})
    return {
        "architectures": ["UniARForConditionalGeneration"], "dtype": dtype, "image_token_id": image_token_id,
        "model_type": "uniar", "text_config": text, "tie_word_embeddings": False,
        "transformers_version": "4.57.0", "video_token_id": video_token_id, "vision_config": vis,
        "vision_end_token_id": vision_end_token_id, "vision_start_token_id": vision_start_token_id,
        "vistok_pred": True, "vistok_pred_layernorm": head_variant == "layernorm",
        "vistok_pred_use_mlp": head_variant == "mlp", "visual_transformer_decoder": True,
        "visual_transformer_decoder_depth": stack_depth,
    }


def config_from_dict(d: dict) -> UniARConfig:
    """Parse a config dict with the checkpoint parser (through a temporary ``config.json``)."""
    with tempfile.TemporaryDirectory(prefix="uniar_cfg_") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f)
        return UniARConfig.from_file(path)


def make_config(**kw) -> UniARConfig:
    """:func:`config_dict` parsed into a :class:`UniARConfig` (same keywords)."""
    return config_from_dict(config_dict(**kw))


def proportionate_config(head_variant: str = "layernorm") -> UniARConfig:
    """The benchmark's CPU configuration: the real model's proportions scaled down (LLM : stack depth 36 : 4 ->
    18 : 2, GQA 4:1, MLP 3x hidden, hidden 256, head_dim 32, bsq_dim 64, 4 levels, 2x2 merge; vision hidden and
    the BSQ MLP width keep the real ratios to the LLM hidden: 1152/4096 and 8192/4096)."""
    return make_config(hidden=256, layers=18, stack_depth=2, heads=8, kv_heads=2, head_dim=32, intermediate=768,
                       vocab=1024, bsq_dim=64, head_variant=head_variant,
                       vision={"hidden_size": 72, "num_heads": 2, "intermediate_size": 272, "bsq_hidden_dim": 512,
                               "depth": 4, "deepstack_visual_indexes": [0, 1, 2]})


def real_config(stack_depth: int = 4) -> UniARConfig:
    """The real UniAR AR sizes: Qwen3-VL-8B text (Qwen3-8B) + SigLIP2-So400M vision, bsq 64, stack depth 4."""
    return make_config(hidden=4096, layers=36, stack_depth=stack_depth, heads=32, kv_heads=8, head_dim=128,
                       intermediate=12288, vocab=151936, bsq_dim=64, mrope_section=[24, 20, 20], dtype="bfloat16",
                       image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                       vision_end_token_id=151653,
                       vision={"hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304, "depth": 27,
                               "deepstack_visual_indexes": [8, 16, 24], "bsq_hidden_dim": 8192,
                               "out_hidden_size": 4096})


# ---------------------------------------------------------------------------------------------- weights
def _key_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def _init_spec(key: str, shape: tuple, gain4: frozenset = frozenset()) -> tuple[str, float, float]:
    """-> (kind, mean, std) for a checkpoint key: kind "normal" (mean + std * N(0,1)); keys in ``gain4`` get
    gain 4 (the output Linears of ``lm_head`` and of the vistok head)."""
    last = key.rsplit(".", 1)[-1]
    parent = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
    if key.endswith("embed_tokens.weight"):
        return "normal", 0.0, 1.0
    if key.endswith("pos_embed.weight"):
        return "normal", 0.0, 0.5
    is_norm = ("norm" in parent or parent in ("0",) and key.startswith("output_layer_vistok.")) and len(shape) == 1
    if is_norm:
        if last == "weight":
            return "normal", 1.0, 0.1
        return "normal", 0.0, 0.05
    if last == "bias":
        return "normal", 0.0, 0.02
    fan_in = int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    gain = 4.0 if key in gain4 else 1.0
    return "normal", 0.0, gain / math.sqrt(fan_in)


def _buffers(cfg: UniARConfig, device) -> dict[str, torch.Tensor]:
    d = cfg.vision.bsq_dim
    return {"bsq.basis": bsq.basis(d, device=device), "bsq.group_basis": torch.ones(1, dtype=torch.int64, device=device)}


@torch.no_grad()
def fill_random(model: UniARModel, seed: int = 0) -> UniARModel:
    """Fill every floating-point parameter of ``model`` (already materialised) deterministically in place."""
    gain4 = {"lm_head.weight"}
    if model.output_layer_vistok is not None:
        v = model.output_layer_vistok.variant
        gain4.add({"linear": "output_layer_vistok.weight", "layernorm": "output_layer_vistok.1.weight",
                   "mlp": "output_layer_vistok.3.weight"}[v])
    gain4 = frozenset(gain4)
    for name, p in model.state_dict(keep_vars=True).items():
        if not p.is_floating_point():
            continue
        key = model.checkpoint_key(name)
        _, mean, std = _init_spec(key, tuple(p.shape), gain4)
        g = torch.Generator(device=p.device)
        g.manual_seed(_key_seed(seed, key))
        # Draw in float32 in chunks of rows (bounded temporary memory at the real size), then cast.
        rows = p.shape[0] if p.dim() else 1
        flat = p.data.view(rows, -1) if p.dim() else p.data.view(1, 1)
        step = max(1, (64 << 20) // max(1, flat.shape[1]))
        for r in range(0, rows, step):
            t = torch.randn(flat[r:r + step].shape, generator=g, device=p.device, dtype=torch.float32)
            flat[r:r + step].copy_(t.mul_(std).add_(mean))
    return model


def random_model(cfg: UniARConfig, components=COMPONENTS, device="cpu", dtype=torch.float32, seed: int = 0,
                 attention: str = "sdpa") -> UniARModel:
    """A :class:`UniARModel` with random weights (see module doc), in eval mode, without gradients."""
    device = torch.device(device)
    with torch.device("meta"):
        model = UniARModel(cfg, tuple(components), dtype=dtype)
    model = model.to_empty(device=device)
    fill_random(model, seed)
    model.attention = attention
    model.eval().requires_grad_(False)
    model.fingerprint = f"synthetic-{seed}"
    return model


def checkpoint_state(model: UniARModel) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint key names, plus the persistent BSQ buffers of the checkpoint."""
    out = {model.checkpoint_key(k): v for k, v in model.state_dict().items()}
    if model.visual is not None:
        for k, v in _buffers(model.cfg, "cpu").items():
            out[f"model.visual.{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------- checkpoint folders
def _shard(keys: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Split ``keys`` (in order) into ``shards`` non-empty contiguous groups of roughly equal bytes."""
    shards = max(1, min(shards, len(keys)))
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for i, k in enumerate(keys):
        g = min(shards - 1, int(acc * shards / max(total, 1)))
        # keep enough keys for the remaining groups
        g = max(g, shards - (len(keys) - i)) if len(keys) - i <= shards else g
        groups[g].append(k)
        acc += sizes[k]
    # fill possibly empty groups by moving keys from their left neighbour
    for g in range(shards):
        if not groups[g]:
            for h in range(g - 1, -1, -1):
                if len(groups[h]) > 1:
                    groups[g].append(groups[h].pop())
                    break
    return [grp for grp in groups if grp]


def write_checkpoint(folder: str, cfg: UniARConfig | dict | None = None, seed: int = 0, shards: int = 1,
                     dtype: torch.dtype = torch.float32, head_variant: str | None = "layernorm",
                     source: str | None = None, bsq_encoder: bool = True) -> str:
    """Write a complete AR checkpoint folder with random weights; returns ``folder``.

    ``cfg``: a :class:`UniARConfig`, a config dict (``config_dict()``), or None for the tiny fixture sizes.
    ``head_variant`` ("layernorm" | "linear" | "mlp"; None keeps the config's) sets the vistok head flags in
    ``config.json`` and the head weights.  ``shards`` > 1 writes ``model-0000x-of-0000y.safetensors`` and
    ``model.safetensors.index.json``.  Tokenizer / processor / generation-config / chat-template files are copied
    from ``source`` (when given).  ``bsq_encoder`` also writes ``bsq_encoder/`` (the vision tower alone, as the
    real checkpoint has it).  Floating-point tensors are stored in ``dtype``, the BSQ buffers in int64."""
    from safetensors.torch import save_file

    if cfg is None:
        d = config_dict()
    elif isinstance(cfg, dict):
        d = copy.deepcopy(cfg)
    else:
        d = copy.deepcopy(cfg.raw)
    if head_variant is not None:
        if head_variant not in HEAD_VARIANTS:
            raise ValueError(f"head_variant must be one of {HEAD_VARIANTS}, got {head_variant!r}")
        d["vistok_pred"] = True
        d["vistok_pred_layernorm"] = head_variant == "layernorm"
        d["vistok_pred_use_mlp"] = head_variant == "mlp"
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    d["dtype"] = dtype_name
    d["text_config"]["dtype"] = dtype_name
    d["vision_config"]["dtype"] = dtype_name
    parsed = config_from_dict(d)
    comps = tuple(c for c in COMPONENTS if c != "gen_head" or parsed.can_generate)
    model = random_model(parsed, comps, "cpu", torch.float32, seed)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in checkpoint_state(model).items()}

    os.makedirs(folder, exist_ok=True)
    for fn in os.listdir(folder):  # stale weights of an earlier write would confuse the loader
        if fn.startswith("model") and (fn.endswith(".safetensors") or fn.endswith(".safetensors.index.json")):
            os.remove(os.path.join(folder, fn))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    keys = sorted(state)
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata=meta)
    else:
        sizes = {k: state[k].numel() * state[k].element_size() for k in keys}
        groups = _shard(keys, sizes, shards)
        n = len(groups)
        weight_map = {}
        for i, grp in enumerate(groups):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: state[k] for k in grp}, os.path.join(folder, fn), metadata=meta)
            weight_map.update({k: fn for k in grp})
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    if bsq_encoder and model.visual is not None:
        enc = write_bsq_encoder_config(folder, d)
        prefix = "model.visual."
        save_file({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                  os.path.join(enc, "model.safetensors"), metadata=meta)
    if source:
        copy_side_files(source, folder)
    return folder


def write_bsq_encoder_config(folder: str, d: dict) -> str:
    """``folder/bsq_encoder/config.json`` (the vision tower alone, as the real checkpoint has it) from the AR
    config dict ``d``; -> the ``bsq_encoder`` folder (its weights: the AR file's ``model.visual.*`` tensors)."""
    enc = os.path.join(folder, "bsq_encoder")
    os.makedirs(enc, exist_ok=True)
    vcfg = dict(d["vision_config"])
    vcfg.update({"architectures": ["UniARVisionModel"], "model_type": "uniar_vision",
                 "transformers_version": d.get("transformers_version", "4.57.0")})
    with open(os.path.join(enc, "config.json"), "w", encoding="utf-8") as f:
        json.dump(vcfg, f, indent=2, sort_keys=True)
    return enc


def copy_side_files(source: str, folder: str) -> None:
    """The tokenizer / processor / generation-config / chat-template files of ``source`` (those present)."""
    for fn in SIDE_FILES:
        src = os.path.join(source, fn)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, fn))
            os.chmod(os.path.join(folder, fn), 0o644)
