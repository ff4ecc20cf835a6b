"""The UniAR decoder as ComfyUI's own model types: a ``MODEL`` (the DiT) and a core ``VAE``.

A thin adapter: the DiT and the VAE are the backend's modules (``uniar_backend.decoder``: the same classes the CLI
and ``UniAR Decode`` run, built from ``comfy.ops``, quantised weights included); this file only gives ComfyUI
what its samplers and VAE nodes read:

* ``UniARDiTModel`` (a ``comfy.model_base.BaseModel``): flow matching (``ModelType.FLOW``) with the shift and
  timestep multiplier of the checkpoint's scheduler, the SD3 latent format with the checkpoint VAE's scaling and
  shift (so KSampler's latent handling and live previews work), and ``extra_conds`` that turn the UniAR entries
  of a ``CONDITIONING`` (``uniar_siglip``, ``uniar_token_grid``) into DiT inputs, checked before sampling;
* ``UniARVAE`` (a ``comfy.sd.VAE``): ComfyUI's encode / decode / tiled / batching around the backend's two VAE
  halves (the checkpoint's SD3 VAE, whatever its size).

Both are wrapped by the patcher ComfyUI uses for its own models, so loading, offloading, low-VRAM streaming,
previews, progress and cancel all come from ComfyUI.  Their patchers carry a rebuild factory
(``cached_patcher_init``, ``model_management.native_dit_patcher`` / ``native_vae_patcher``), so ComfyUI's
multi-GPU nodes (MultiGPU CFG Split, Select Model / VAE Device) can clone them onto other devices.
"""

from __future__ import annotations

import logging

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.sd
import comfy.supported_models_base

from ..uniar_backend.decoder.conditioning import PIXELS_PER_PATCH, check_output_size, max_output_side
from ..uniar_backend.errors import InputError

log = logging.getLogger("UniAR")

# the CONDITIONING entries the pack adds (the node that makes them is named in every error)
SIGLIP_KEY = "uniar_siglip"
GRID_KEY = "uniar_token_grid"
FINGERPRINT_KEY = "uniar_fingerprint"
COND_NODE = "UniAR Tokens to Conditioning"


class UniARLatentFormat(comfy.latent_formats.SD3):
    """SD3's latent format (its preview colours) with the scaling and shift of the checkpoint's VAE."""

    def __init__(self, scale: float = 1.5305, shift: float = 0.0609, channels: int = 16, downscale: int = 8):
        super().__init__()
        self.scale_factor, self.shift_factor = float(scale), float(shift)
        self.latent_channels = int(channels)
        self.spacial_downscale_ratio = int(downscale)
        if channels != len(self.latent_rgb_factors):
            self.latent_rgb_factors = self.latent_rgb_factors_bias = None
            self.taesd_decoder_name = None


class UniARModelConfig(comfy.supported_models_base.BASE):
    """What ``BaseModel`` reads of a model config; the DiT itself is built by the backend."""

    unet_config = {}
    unet_extra_config = {}
    memory_usage_factor = 1.6  # as ComfyUI's SD3.5 (same MMDiT)
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, scheduler_config: dict, vae_config, vae_scale: int):
        super().__init__({"disable_unet_model_creation": True})
        self.scheduler_config = dict(scheduler_config)
        self.sampling_settings = {"shift": float(scheduler_config.get("shift", 1.0)),
                                  "multiplier": float(scheduler_config.get("num_train_timesteps", 1000))}
        c = vae_config  # the backend VAE's config (``vae.config``): scaling, shift, latent channels
        self.latent_format = UniARLatentFormat(c.scaling_factor, c.shift_factor or 0.0, c.latent_channels, vae_scale)


class _ComfyDiT(torch.nn.Module):
    """ComfyUI's calling convention (``x, timesteps, context, y, ...``) over the backend DiT."""

    def __init__(self, dit, dtype: torch.dtype):
        super().__init__()
        self.dit = dit
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _buffers_to(self, device: torch.device) -> None:
        # the legacy ModelPatcher's partial (low-VRAM) load moves the layers, not the position-table factors
        for mod in self.dit.modules():
            for k, b in mod._buffers.items():
                if b is not None and b.device != device:
                    mod._buffers[k] = b.to(device)

    def forward(self, x, timesteps, context=None, y=None, uniar_siglip=None, uniar_token_grid=None, control=None,
                transformer_options={}, **kwargs):
        b = next(self.dit.buffers(), None)
        if b is not None and b.device != x.device:
            self._buffers_to(x.device)
        p = self.dit.config.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        condition = self.dit.condition(context, y, uniar_siglip, grid,
                                       tuple(uniar_token_grid) if uniar_token_grid is not None else None)
        return self.dit(x, timestep=timesteps, condition=condition)[0]  # flash-attn off CUDA: SDPA (layers.attention)


class UniARDiTModel(comfy.model_base.BaseModel):
    """The UniAR DiT as a ComfyUI model (shown by this name in ComfyUI's model-management log)."""

    def __init__(self, model_config: UniARModelConfig, dit, dtype: torch.dtype, fingerprint: str, name: str,
                 device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = _ComfyDiT(dit, dtype)
        self.uniar_fingerprint = fingerprint
        self.uniar_name = name
        self.uniar_scheduler_config = model_config.scheduler_config  # what UniAR Reference Sigmas reads
        self.vae_scale = model_config.latent_format.spacial_downscale_ratio
        archive = getattr(mm, "archive_model_dtypes", None)
        if archive is not None:  # what ComfyUI records of the models it builds (dynamic VRAM restores these)
            archive(self.diffusion_model)

    def encode_adm(self, **kwargs):
        return kwargs.get("pooled_output", None)

    def extra_conds(self, **kwargs):
        """The conditioning entries -> DiT inputs, with every check made before the first step."""
        siglip = kwargs.get(SIGLIP_KEY, None)
        if siglip is None:
            raise InputError(
                f"the conditioning given to the UniAR model has no UniAR token features: connect positive and "
                f"negative from a '{COND_NODE}' node (plain text conditioning cannot drive the UniAR decoder)")
        dit = self.diffusion_model.dit
        fp = kwargs.get(FINGERPRINT_KEY, "")
        if fp and self.uniar_fingerprint and fp != self.uniar_fingerprint:
            raise InputError(
                f"the conditioning was made with another UniAR checkpoint's token encoder than this model "
                f"({self.uniar_name}): give '{COND_NODE}' and 'UniAR Decoder Loader' the same UniAR model")
        if siglip.ndim != 3 or siglip.shape[-1] != dit.siglip_channels:
            raise InputError(
                f"UniAR token features of shape {tuple(siglip.shape)} do not fit this DiT ({dit.siglip_channels} "
                f"channels): give '{COND_NODE}' and 'UniAR Decoder Loader' the same UniAR model")
        gh, gw = kwargs[GRID_KEY]
        noise = kwargs.get("noise", None)
        if noise is not None:
            self._check_latent(noise, siglip, (gh, gw))
        cross_attn = kwargs.get("cross_attn", None)
        pooled = kwargs.get("pooled_output", None)
        widths = (dit.config.joint_attention_dim, dit.config.pooled_projection_dim)
        if cross_attn is None or pooled is None or (cross_attn.shape[-1], pooled.shape[-1]) != widths:
            got = (None if cross_attn is None else cross_attn.shape[-1], None if pooled is None else pooled.shape[-1])
            raise InputError(
                f"the text part of the UniAR conditioning has widths {got}, this DiT expects {widths} (SD3 text "
                f"conditioning, e.g. from CLIPTextEncodeSD3): leave '{COND_NODE}''s conditioning input empty to "
                "use the checkpoint's decoder prompt")
        out = super().extra_conds(**kwargs)
        out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)  # the MMDiT takes the sequence as it is
        out[SIGLIP_KEY] = comfy.conds.CONDRegular(siglip)
        out[GRID_KEY] = comfy.conds.CONDConstant((int(gh), int(gw)))
        return out

    def _check_latent(self, noise: torch.Tensor, siglip: torch.Tensor, grid: tuple[int, int]) -> None:
        dit = self.diffusion_model.dit
        lf = self.latent_format
        ar = (grid[0] * PIXELS_PER_PATCH, grid[1] * PIXELS_PER_PATCH)
        if noise.ndim != 4 or noise.shape[1] != lf.latent_channels:
            raise InputError(f"the latent has shape {tuple(noise.shape)}; the UniAR DiT takes {lf.latent_channels}-"
                             "channel image latents: use 'UniAR Empty Latent' with the same tokens")
        out = (noise.shape[-2] * self.vae_scale, noise.shape[-1] * self.vae_scale)
        if siglip.shape[0] not in (1, noise.shape[0]):
            raise InputError(f"the tokens hold {siglip.shape[0]} images but the latent has batch {noise.shape[0]}: "
                             "use 'UniAR Empty Latent' with the same tokens")
        try:
            check_output_size(ar, out, dit.super_resolution, max_output_side(dit, self.vae_scale))
        except InputError as e:
            raise InputError(f"the latent does not fit the tokens: {e}. Make it with 'UniAR Empty Latent' from the "
                             "same tokens (its upsampling_ratio sets the size)") from None


# --------------------------------------------------------------------------------------------- VAE
class UniARVAEModel(torch.nn.Module):
    """What ``comfy.sd.VAE`` calls: ``decode(z)`` -> images in [-1, 1], ``encode(x)`` -> the latent mean (both
    halves are the backend's modules)."""

    def __init__(self, decoder, encoder=None):
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder

    def decode(self, z, **kwargs):
        return self.decoder.decode(z)[0]

    def encode(self, x, **kwargs):
        if self.encoder is None:
            raise InputError("this UniAR VAE was loaded without its encoder: VAE Encode cannot use it")
        return self.encoder.encode(x)


class _DropNoWeightsWarning(logging.Filter):
    def filter(self, record):
        return "No VAE weights detected" not in str(record.msg)


class UniARVAE(comfy.sd.VAE):
    """A core ``VAE`` whose model is the backend's VAE (the checkpoint's SD3 VAE config, whatever its size).  The attributes ComfyUI's VAE methods read come from this release's own ``VAE.__init__`` (called with no
    weights: it sets its defaults and stops), then the decoder, devices and patcher are set as it would set them."""

    def __init__(self, vae, encoder, downscale: int, patcher_cls):
        flt = _DropNoWeightsWarning()
        root = logging.getLogger()
        root.addFilter(flt)
        try:
            super().__init__(sd={})
        finally:
            root.removeFilter(flt)
        self.latent_channels = int(vae.config.latent_channels)
        self.downscale_ratio = self.upscale_ratio = int(downscale)
        self.first_stage_model = UniARVAEModel(vae, encoder).eval()
        self.device = mm.vae_device()
        offload = mm.vae_offload_device()
        self.vae_dtype = next(vae.parameters()).dtype
        self.working_dtypes = [self.vae_dtype]
        self.output_device = mm.intermediate_device()
        archive = getattr(mm, "archive_model_dtypes", None)
        if archive is not None:
            archive(self.first_stage_model)
        self.patcher = patcher_cls(self.first_stage_model, load_device=self.device, offload_device=offload)
        if hasattr(self, "size"):
            self.size = None
        if hasattr(self, "model_size"):
            self.model_size()
