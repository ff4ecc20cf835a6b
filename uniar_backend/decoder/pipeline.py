"""Visual tokens -> images: UniAR's SD3.5 decoder, reproducing ``UniARVisualDecoder.decode`` numerically.

Steps (ARCHITECTURE.md section 7):

1. target size ``(round(ar_h * r), round(ar_w * r))``, multiples of 16;
2. indices -> bits (reference codec, 64-bit quirk) -> raw ``bsq_output_proj*`` features per level;
3. ``siglip_tensor``: levels interleaved on channels (``c * levels + level``), raster order over the 16-px grid;
4. CFG batch ``[uncond (all-zero siglip_tensor), cond]`` with the constant decoder prompt in both halves;
5. initial noise ``torch.randn`` from a CPU generator seeded with ``seed``, in the model dtype (device-independent);
6. FlowMatch Euler steps, ``v = v_u + g (v_c - v_u)`` (no CFG at all when ``g <= 1``, as diffusers);
7. VAE decode of ``latents / scaling + shift``; ``(x / 2 + 0.5).clamp(0, 1)``.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from ..errors import CheckpointError, InputError
from ..limits import seed_list
from ..tokens import VisualTokens
from .components import latent_scale
from .conditioning import (check_output_size, check_steps, check_tokens, make_scheduler, max_output_side,
                           reference_noise, target_size, token_features, token_grid)
from .prompt import DEFAULT_DECODER_PROMPT, PromptEmbeddings, check_prompt, prompt_embeddings

Callback = Callable[[int, int], None]


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def check_decode_args(steps, guidance, seed) -> None:
    """``seed``: one seed, or a list of one per image (:meth:`UniARDecoder.decode`)."""
    check_steps(steps)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InputError(f"guidance must be a finite number, got {guidance!r}")
    seed_list(seed)


class UniARDecoder:
    """The image decoder of one UniAR checkpoint.

    The big modules are plain attributes (``transformer``: the DiT, ``vae``, ``bsq_proj``: the BSQ output
    projections), so a host such as ComfyUI may wrap and move them; :meth:`decode` runs each module on the
    device it currently sits on.  Build with :func:`uniar_backend.decoder.load_decoder`."""

    def __init__(self, root: str, transformer, vae, bsq_proj, scheduler_config: dict, fingerprint: str = "",
                 cache_dir: str | None = None, encoder_device=None):
        self.root = root
        self.transformer = transformer
        self.vae = vae
        self.bsq_proj = bsq_proj
        self.scheduler_config = dict(scheduler_config)
        self.fingerprint = fingerprint
        self.cache_dir = cache_dir
        self.encoder_device = encoder_device  # where a new decoder prompt is encoded (None: the DiT's device)
        self._embeddings: dict[str, PromptEmbeddings] = {}
        self._device = None
        bcfg = bsq_proj.cfg
        self.bsq_dim, self.levels, self.merge_unit = bcfg.bsq_dim, bcfg.levels, bcfg.merge_unit
        self.merge_size = bcfg.spatial_merge_size
        tcfg = transformer.config
        if transformer.siglip_channels != self.levels * bcfg.hidden_size:
            raise CheckpointError(
                f"{root}: sd3_transformer expects {transformer.siglip_channels} feature channels but bsq_encoder "
                f"gives {self.levels} levels x {bcfg.hidden_size}; the two folders do not belong together"
            )
        self.vae_scale = latent_scale(root, transformer, vae)
        self.latent_channels = tcfg.in_channels

    def __repr__(self):
        return f"UniARDecoder({self.root!r}, device={self.device}, dtype={self.dtype})"

    @property
    def device(self) -> torch.device:
        """The compute device: set by a host that streams weights (ComfyUI, where some layers keep their weights
        on the offload device and cast them per call), else the DiT's parameter device."""
        return self._device if self._device is not None else _param(self.transformer).device

    @device.setter
    def device(self, value) -> None:
        self._device = None if value is None else torch.device(value)

    @property
    def dtype(self) -> torch.dtype:
        return _param(self.transformer).dtype

    # ------------------------------------------------------------------ prompt
    def set_prompt_embeddings(self, emb: PromptEmbeddings) -> None:
        tcfg = self.transformer.config
        widths = (emb.prompt_embeds.shape[-1], emb.pooled.shape[-1])
        if widths != (tcfg.joint_attention_dim, tcfg.pooled_projection_dim):
            raise CheckpointError(
                f"decoder-prompt embeddings have widths {emb.prompt_embeds.shape[-1]}/{emb.pooled.shape[-1]}, the DiT "
                f"expects {tcfg.joint_attention_dim}/{tcfg.pooled_projection_dim}: the text encoders (or the cache) "
                "do not belong to this checkpoint"
            )
        self._embeddings[emb.prompt] = emb

    def prompt_embeddings(self, prompt: str | None = None) -> PromptEmbeddings:
        """Embeddings of a decoder prompt: from memory, else the cache file, else encoded once (and cached)."""
        prompt = check_prompt(prompt)
        if prompt not in self._embeddings:
            emb = prompt_embeddings(self.root, prompt, device=self.encoder_device or self.device, dtype=self.dtype,
                                    cache_dir=self.cache_dir)
            self.set_prompt_embeddings(emb)
        return self._embeddings[prompt]

    # ------------------------------------------------------------------ checks
    def check(self, tokens: VisualTokens, steps: int = 28, guidance: float = 1.5, upsampling_ratio: float = 1.0,
              seed: int = 0) -> tuple[int, int]:
        """Validate everything :meth:`decode` needs (cheap); returns the output (height, width)."""
        check_tokens(tokens, self.bsq_dim, self.levels, self.merge_unit, self.fingerprint)
        check_decode_args(steps, guidance, seed)
        seed_list(seed, tokens.batch_size, "token grid(s)")
        h, w = target_size(tokens.ar_height, tokens.ar_width, upsampling_ratio)
        check_output_size((tokens.ar_height, tokens.ar_width), (h, w), self.transformer.super_resolution,
                          max_output_side(self.transformer, self.vae_scale))
        return h, w

    # ------------------------------------------------------------------ pieces
    def token_features(self, tokens: VisualTokens) -> torch.Tensor:
        """``siglip_tensor`` (B, gh*gw, levels*Dv) of the tokens (:func:`.conditioning.token_features`)."""
        return token_features(self.bsq_proj, tokens, self.device)

    def initial_latents(self, batch: int, height: int, width: int, seed) -> torch.Tensor:
        """The starting latents for ``seed`` (:func:`.conditioning.reference_noise`, in the model dtype): one draw
        over the batch, or with a list of seeds each image's own draw (what that image alone gets with its seed)."""
        shape = (batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if isinstance(seed, (list, tuple)):
            return torch.cat([reference_noise((1,) + shape[1:], s, self.dtype) for s in seed])
        return reference_noise(shape, seed, self.dtype)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, tokens: VisualTokens, steps: int = 28, guidance: float = 1.5, upsampling_ratio: float = 1.0,
               seed: int = 0, decoder_prompt: str | None = None, callback: Callback | None = None, *,
               trace: dict | None = None) -> torch.Tensor:
        """Decode visual tokens to images ``[B, H, W, 3]`` float32 in [0, 1] on the CPU (ComfyUI IMAGE layout).

        ``seed``: the reference's one noise draw over the batch, or a list of one seed per grid (each image starts
        from the noise it gets when decoded alone with its seed; batch runs).

        ``callback(done, total)`` is called after every denoising step (``done`` = 1..steps); an exception it
        raises cancels the decode and propagates (nothing is left half-changed: the scheduler is per call).
        ``trace``, if a dict, receives the intermediate tensors (siglip_tensor, initial_latents, noise_preds,
        vae_input, vae_output) for debugging and tests."""
        height, width = self.check(tokens, steps, guidance, upsampling_ratio, seed)
        emb = self.prompt_embeddings(decoder_prompt)
        dit = self.transformer
        dev, dt = self.device, self.dtype
        B = tokens.batch_size
        cfg = guidance > 1  # diffusers: do_classifier_free_guidance = guidance_scale > 1

        siglip = self.token_features(tokens).to(dev, dt)
        grid = token_grid(tokens)
        cond = emb.to(dev, dt)
        text = cond.prompt_embeds.expand(B, -1, -1)
        pooled = cond.pooled.expand(B, -1)
        if cfg:  # negative prompt == prompt; the unconditional half sees an all-zero token tensor
            text, pooled = torch.cat([text, text]), torch.cat([pooled, pooled])
            siglip_in = torch.cat([torch.zeros_like(siglip), siglip])
        else:
            siglip_in = siglip

        latents = self.initial_latents(B, height, width, seed)
        if trace is not None:
            trace.update(siglip_tensor=siglip.detach().cpu(), initial_latents=latents.clone(), noise_preds=[])
        latents = latents.to(dev)

        p = dit.config.patch_size
        scheduler = make_scheduler(self.scheduler_config, steps, dev,
                                   image_seq_len=(height // self.vae_scale // p) * (width // self.vae_scale // p))
        timesteps = scheduler.timesteps
        # prompt projection, pooled embedding and token features are the same at every step: computed once
        condition = dit.condition(text, pooled, siglip_in, (latents.shape[-2] // p, latents.shape[-1] // p),
                                  grid)
        for i, t in enumerate(timesteps):
            x_in = torch.cat([latents, latents]) if cfg else latents
            v = dit(x_in, timestep=t.expand(x_in.shape[0]), condition=condition)[0]
            if trace is not None:
                trace["noise_preds"].append(v.detach().cpu())
            if cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]  # Euler, computed in float32
            if callback is not None:
                callback(i + 1, len(timesteps))

        vae = self.vae
        vp = _param(vae)
        z = (latents / vae.config.scaling_factor + vae.config.shift_factor).to(self.device, vp.dtype)
        image = vae.decode(z, return_dict=False)[0]
        if trace is not None:
            trace.update(vae_input=z.detach().cpu(), vae_output=image.detach().cpu())
        image = (image / 2 + 0.5).clamp(0, 1)
        return image.permute(0, 2, 3, 1).float().cpu().contiguous()


# ---------------------------------------------------------------------------------------------- loading
def load_decoder(ckpt_or_path, device="auto", dtype="auto", attention="auto", cache_dir=None, ops=None,
                 decoder_prompt: str | None = None, compute_device=None, weights: str | None = None) -> UniARDecoder:
    """Load the decoder parts of a UniAR checkpoint (safetensors only, no network, no remote code).

    Order keeps the peak low: the decoder-prompt embeddings are resolved first (from the cache, or by loading the
    text encoders one at a time and releasing them), then the BSQ projections, the DiT and the VAE.

    ``ckpt_or_path``: a :class:`~uniar_backend.loader.Checkpoint` or a folder; ``device`` auto/cpu/cuda/mps;
    ``dtype`` auto/float32/bfloat16/float16; ``attention`` auto/sdpa/eager/flash_attention_2 (DiT; the VAE uses
    sdpa, or eager when asked); ``cache_dir`` for the prompt embeddings (default: ``<checkpoint>/.uniar_cache``
    when writable, else ``~/.cache/uniar/...``); ``ops`` a layer namespace (e.g. ``comfy.ops``) for the BSQ
    projections and the DiT; ``decoder_prompt`` the prompt prepared up front (default: UniAR's constant decoder prompt);
    ``compute_device`` (default: ``device``) where it will run, which decides the attention backend and the
    ``auto`` dtype (a host may load onto an offload device and move or stream the weights later); ``weights``
    int8 / fp8 / int4 quantises the DiT's transformer blocks of a float folder while loading (a folder stored
    quantised loads as stored)."""
    from ..runtime import resolve_attention, resolve_device, resolve_dtype
    from . import components as C

    root = C.checkpoint_root(ckpt_or_path)
    dev = resolve_device(device)
    cdev = resolve_device(compute_device) if compute_device is not None else dev
    dt = resolve_dtype(dtype, cdev)
    backend = resolve_attention(attention, cdev, dt)
    if weights is not None:
        from ..quant import check_format

        check_format(weights)
    # Cheap checks of every part first, so a missing or truncated file fails before anything heavy is loaded.
    sched_cfg = C.check_parts(root)
    cache_dir = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else None
    emb = prompt_embeddings(root, decoder_prompt, device=dev, dtype=dt, cache_dir=cache_dir)

    bsq_proj, fingerprint = C.load_bsq_projections(root, dev, dt, ops)
    transformer = C.load_transformer(root, dev, dt, backend, weights=weights, compute_device=cdev, ops=ops)
    vae = C.load_vae(root, dev, dt, backend, ops=ops)
    dec = UniARDecoder(root, transformer, vae, bsq_proj, sched_cfg, fingerprint, cache_dir)
    dec.attention = backend
    if cdev != dev:
        dec.device = cdev
    dec.set_prompt_embeddings(emb)
    return dec


__all__ = ["DEFAULT_DECODER_PROMPT", "UniARDecoder", "load_decoder", "target_size", "check_decode_args"]
