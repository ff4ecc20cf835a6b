"""The UniAR autoregressive model as plain modules with the checkpoint's key names:
``model.language_model.*``, ``model.visual.*``, ``lm_head``, ``output_layer_vistok``, ``visual_decoder.*``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import UniARConfig
from .layers import RMSNorm
from .text import MRoPE, TextDecoderLayer, TextModel
from .vision import VisionTower

COMPONENTS = ("llm", "vision", "lm_head", "gen_head")


class VistokHead(nn.Module):
    """``output_layer_vistok`` in its three variants (chosen by config, checked against the keys)."""

    def __init__(self, cfg: UniARConfig, ops, device=None, dtype=None):
        super().__init__()
        d, o = cfg.text.hidden_size, cfg.vistok_out_dim
        self.variant = "mlp" if cfg.vistok_pred_use_mlp else ("layernorm" if cfg.vistok_pred_layernorm else "linear")
        if self.variant == "mlp":
            self.seq = nn.ModuleList([
                RMSNorm(d, cfg.text.rms_norm_eps, device=device, dtype=dtype),
                ops.Linear(d, 16 * 1024, bias=False, device=device, dtype=dtype),
                nn.Identity(),
                ops.Linear(16 * 1024, o, bias=False, device=device, dtype=dtype),
            ])
        elif self.variant == "layernorm":
            self.seq = nn.ModuleList([
                RMSNorm(d, cfg.text.rms_norm_eps, device=device, dtype=dtype),
                ops.Linear(d, o, bias=False, device=device, dtype=dtype),
            ])
        else:
            self.seq = ops.Linear(d, o, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        if self.variant == "linear":
            return self.seq(x)
        if self.variant == "layernorm":
            return self.seq[1](self.seq[0](x))
        return self.seq[3](F.gelu(self.seq[1](self.seq[0](x)), approximate="tanh"))

    def key_map(self, name: str) -> str:
        # module keys "seq.0.weight" / "seq.weight" -> checkpoint "output_layer_vistok.0.weight" / ".weight"
        return name[4:] if name.startswith("seq.") else name


class _Inner(nn.Module):
    pass


class UniARModel(nn.Module):
    """Holds the components that were asked for; the rest stay ``None``."""

    def __init__(self, cfg: UniARConfig, components=COMPONENTS, ops=None, device=None, dtype=None):
        super().__init__()
        from .layers import resolve_ops

        ops = resolve_ops(ops)
        self.cfg = cfg
        self.components = tuple(components)
        self.model = _Inner()
        self.model.language_model = TextModel(cfg.text, ops, device, dtype) if "llm" in components else None
        # The codebook side of the vision tower (BSQ output projections + mergers) comes with the LLM: generation
        # and captioning from tokens need it.  The ViT encoder itself only with the "vision" component.
        self.model.visual = (VisionTower(cfg.vision, cfg.text.hidden_size, ops, device, dtype,
                                         encoder="vision" in components)
                             if ("vision" in components or "llm" in components) else None)
        self.lm_head = (ops.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, device=device, dtype=dtype)
                        if "lm_head" in components else None)
        if "gen_head" in components:
            self.output_layer_vistok = VistokHead(cfg, ops, device, dtype)
            self.visual_decoder = nn.ModuleList(
                TextDecoderLayer(cfg.text, ops, device, dtype) for _ in range(cfg.visual_transformer_decoder_depth)
            )
        else:
            self.output_layer_vistok = None
            self.visual_decoder = None
        self.rope = MRoPE(cfg.text)
        self.attention = "sdpa"
        self.fingerprint = ""
        self.weight_format = None  # int8 / fp8 / int4 when the decoder-layer Linears are quantised (uniar_backend.quant)
        self._device = None

    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    @property
    def visual(self) -> VisionTower:
        return self.model.visual

    @property
    def device(self) -> torch.device:
        """The compute device: set explicitly by a host that streams weights (ComfyUI low-VRAM mode, where
        some parameters stay on the offload device), else the device of the parameters."""
        if self._device is not None:
            return self._device
        return next(self.parameters()).device

    @device.setter
    def device(self, value) -> None:
        self._device = None if value is None else torch.device(value)

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point() and p.element_size() > 1).dtype

    def checkpoint_key(self, name: str) -> str:
        if name.startswith("output_layer_vistok."):
            return "output_layer_vistok." + self.output_layer_vistok.key_map(name[len("output_layer_vistok."):])
        return name
