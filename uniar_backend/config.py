"""UniAR configuration, read from the checkpoint's ``config.json`` (nothing about sizes is hard-coded)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError


def read_json(path: str) -> dict:
    """A checkpoint's JSON object (bounded size, one clear error on any parse failure: :mod:`.jsonfile`)."""
    from .jsonfile import read_json_file

    return read_json_file(path)


# Sizes beyond these are no UniAR (the real model: hidden 4096, 36 layers, vocab 151936): rejecting them keeps a
# damaged or hostile config.json from building absurd modules.
MAX_SIZE = 1 << 20
MAX_LAYERS = 1024


def _get(d: dict, key: str, path: str, typ=int, default: Any = ..., lo=None, hi=None):
    """``d[key]`` as ``typ`` (the default when absent, if one is given), within ``lo``..``hi`` when given (the
    default too): a missing, mistyped or out-of-range field is a CheckpointError naming it."""
    if key not in d:
        if default is ...:
            raise CheckpointError(f"{path}: required field '{key}' is missing")
        v = default
    else:
        v = d[key]
    try:
        if typ is bool:
            if not isinstance(v, bool):
                raise TypeError
            return v
        if typ is int and (isinstance(v, bool) or int(v) != v):
            raise TypeError
        v = typ(v)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{path}: field '{key}' has unexpected value {v!r} (expected {typ.__name__})") from None
    if typ in (int, float) and not ((lo is None or v >= lo) and (hi is None or v <= hi)) or v != v:
        rng = f"{'' if lo is None else lo}..{'' if hi is None else hi}"
        raise CheckpointError(f"{path}: field '{key}' = {v!r} is outside {rng}; config.json is damaged or not UniAR's")
    return v


def _size(d: dict, key: str, path: str, default: Any = ...):
    return _get(d, key, path, int, default, lo=1, hi=MAX_SIZE)


@dataclass
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 262144

    @classmethod
    def from_dict(cls, d: dict, path: str) -> "TextConfig":
        hidden = _size(d, "hidden_size", path)
        heads = _size(d, "num_attention_heads", path)
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        section = rope.get("mrope_section")
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise CheckpointError(f"{path}: text_config has no rope_theta")
        if not (isinstance(section, list) and len(section) == 3 and all(isinstance(s, int) for s in section)):
            raise CheckpointError(f"{path}: text_config.rope_scaling.mrope_section must be 3 integers, got {section!r}")
        if rope.get("mrope_interleaved") is False:
            raise CheckpointError(f"{path}: only interleaved mRoPE (Qwen3-VL) is supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise CheckpointError(f"{path}: unsupported rope_type {rope_type!r} (UniAR uses 'default')")
        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=_get(d, "num_hidden_layers", path, lo=1, hi=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", path, default=heads, lo=1, hi=heads),
            head_dim=_get(d, "head_dim", path, default=max(1, hidden // heads), lo=2, hi=MAX_SIZE),
            intermediate_size=_size(d, "intermediate_size", path),
            vocab_size=_get(d, "vocab_size", path, lo=1, hi=1 << 24),
            rms_norm_eps=_get(d, "rms_norm_eps", path, float, 1e-6, lo=0.0, hi=1.0),
            rope_theta=_get({"rope_theta": theta}, "rope_theta", path, float, lo=1.0),
            mrope_section=list(section),
            hidden_act=_get(d, "hidden_act", path, str, "silu"),
            attention_bias=_get(d, "attention_bias", path, bool, False),
            max_position_embeddings=_get(d, "max_position_embeddings", path, int, 262144, lo=1, hi=1 << 24),
        )
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"{path}: text hidden_act {cfg.hidden_act!r} is not supported (expected 'silu')")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
        if any(x < 0 for x in cfg.mrope_section) or 2 * sum(cfg.mrope_section) != cfg.head_dim:
            raise CheckpointError(
                f"{path}: mrope_section {cfg.mrope_section} does not cover head_dim/2 = {cfg.head_dim // 2}"
            )
        return cfg


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    num_position_embeddings: int
    deepstack_visual_indexes: list
    bsq_dim: int
    bsq_hidden_dim: int
    bsq_skip_final_layernorm: bool = True
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def levels(self) -> int:
        return 1 + len(self.deepstack_visual_indexes)

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        return int(self.num_position_embeddings**0.5)

    @classmethod
    def from_dict(cls, d: dict, path: str) -> "VisionConfig":
        if d.get("use_bsq") is False:
            raise CheckpointError(f"{path}: vision_config.use_bsq is false; this is not a UniAR (BSQ) checkpoint")
        ds = d.get("deepstack_visual_indexes", [])
        if not (isinstance(ds, list) and all(isinstance(i, int) for i in ds)):
            raise CheckpointError(f"{path}: vision_config.deepstack_visual_indexes must be a list of integers")
        cfg = cls(
            depth=_get(d, "depth", path, lo=1, hi=MAX_LAYERS),
            hidden_size=_size(d, "hidden_size", path),
            num_heads=_size(d, "num_heads", path),
            intermediate_size=_size(d, "intermediate_size", path),
            out_hidden_size=_size(d, "out_hidden_size", path),
            patch_size=_size(d, "patch_size", path),
            temporal_patch_size=_get(d, "temporal_patch_size", path, lo=1, hi=16),
            spatial_merge_size=_size(d, "spatial_merge_size", path),
            in_channels=_get(d, "in_channels", path, int, 3, lo=1, hi=16),
            num_position_embeddings=_size(d, "num_position_embeddings", path),
            deepstack_visual_indexes=list(ds),
            bsq_dim=_get(d, "bsq_dim", path, lo=1, hi=64),
            bsq_hidden_dim=_size(d, "bsq_hidden_dim", path),
            bsq_skip_final_layernorm=_get(d, "bsq_skip_final_layernorm", path, bool, True),
            hidden_act=_get(d, "hidden_act", path, str, "gelu_pytorch_tanh"),
        )
        if not 1 <= cfg.bsq_dim <= 64:
            raise CheckpointError(f"{path}: bsq_dim={cfg.bsq_dim} is outside 1..64")
        if cfg.patch_size * cfg.spatial_merge_size != 32:
            raise CheckpointError(
                f"{path}: patch_size x spatial_merge_size = {cfg.patch_size * cfg.spatial_merge_size}; "
                "UniAR tokens cover 32x32 pixels (patch 16, merge 2)"
            )
        if cfg.num_grid_per_side**2 != cfg.num_position_embeddings:
            raise CheckpointError(f"{path}: num_position_embeddings={cfg.num_position_embeddings} is not a square")
        if any(not 0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
            raise CheckpointError(f"{path}: deepstack_visual_indexes {ds} outside 0..depth-1")
        if cfg.hidden_size % cfg.num_heads:
            raise CheckpointError(f"{path}: vision hidden_size must be a multiple of num_heads")
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise CheckpointError(f"{path}: vision hidden_act {cfg.hidden_act!r} is not supported")
        return cfg


@dataclass
class UniARConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    vistok_pred: bool
    vistok_pred_layernorm: bool
    vistok_pred_use_mlp: bool
    visual_transformer_decoder: bool
    visual_transformer_decoder_depth: int
    tie_word_embeddings: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def vistok_out_dim(self) -> int:
        v = self.vision
        return v.levels * v.merge_unit * v.bsq_dim * 2

    @property
    def can_generate(self) -> bool:
        return self.vistok_pred and self.visual_transformer_decoder

    @classmethod
    def from_file(cls, path: str) -> "UniARConfig":
        d = read_json(path)
        model_type = d.get("model_type")
        if model_type != "uniar":
            raise CheckpointError(
                f"{path}: model_type is {model_type!r}, expected 'uniar'; this folder is not a UniAR checkpoint "
                "(download ShareLab-SII/UniAR-SFT or UniAR-RL)"
            )
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                raise CheckpointError(f"{path}: '{key}' is missing")
        cfg = cls(
            text=TextConfig.from_dict(d["text_config"], path),
            vision=VisionConfig.from_dict(d["vision_config"], path),
            image_token_id=_get(d, "image_token_id", path, int, 151655, lo=0, hi=(1 << 24) - 1),
            video_token_id=_get(d, "video_token_id", path, int, 151656, lo=0, hi=(1 << 24) - 1),
            vision_start_token_id=_get(d, "vision_start_token_id", path, int, 151652, lo=0, hi=(1 << 24) - 1),
            vision_end_token_id=_get(d, "vision_end_token_id", path, int, 151653, lo=0, hi=(1 << 24) - 1),
            vistok_pred=_get(d, "vistok_pred", path, bool, False),
            vistok_pred_layernorm=_get(d, "vistok_pred_layernorm", path, bool, False),
            vistok_pred_use_mlp=_get(d, "vistok_pred_use_mlp", path, bool, False),
            visual_transformer_decoder=_get(d, "visual_transformer_decoder", path, bool, False),
            visual_transformer_decoder_depth=_get(d, "visual_transformer_decoder_depth", path, int, 4, lo=1,
                                                  hi=MAX_LAYERS),
            tie_word_embeddings=_get(d, "tie_word_embeddings", path, bool, False),
            raw=d,
        )
        vocab = cfg.text.vocab_size
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(cfg, key) >= vocab:
                raise CheckpointError(f"{path}: {key} = {getattr(cfg, key)} is not below text_config.vocab_size "
                                      f"= {vocab}; config.json is damaged")
        return cfg
