"""Visual tokens -> the DiT's condition, without the DiT: the pieces a host sampler needs to run UniAR's decoder
one step at a time (ComfyUI's KSampler / SamplerCustomAdvanced, the native route of the nodes).

:class:`~uniar_backend.decoder.pipeline.UniARDecoder` runs the whole decode itself and uses the same functions,
so both routes compute the token features, the starting noise and the schedule identically:

* :func:`token_features`: indices -> bits -> raw ``bsq_output_proj*`` features, ``siglip_tensor`` layout;
* :func:`reference_noise`: the decoder's starting latents for a seed (a CPU generator, the model dtype);
* :func:`reference_sigmas`: the checkpoint scheduler's flow-matching sigmas (final 0 included);
* :func:`output_ratio` / :func:`check_output_size`: which latent sizes belong to a token grid;
* :class:`TokenConditioner`: the BSQ projections and decoder-prompt embeddings of one checkpoint.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from ..errors import InputError, TokenError
from ..limits import check_seed
from ..tokens import VisualTokens
from .prompt import PromptEmbeddings, check_prompt, prompt_embeddings

MAX_STEPS = 1000
RATIO_RANGE = (1.0, 2.0)
PIXELS_PER_PATCH = 16  # one siglip_tensor entry per 16x16 pixels of the AR image


# ---------------------------------------------------------------------------------------------- features
def check_tokens(tokens, bsq_dim: int, levels: int, merge_unit: int, fingerprint: str) -> None:
    """Raise :class:`TokenError` for tokens a decoder with these code settings cannot read; warn for tokens of
    another checkpoint with the same settings (UniAR-SFT and UniAR-RL share their visual tokenizer)."""
    if not isinstance(tokens, VisualTokens):
        raise TokenError(f"expected VisualTokens, got {type(tokens).__name__}")
    tokens.validate()
    for w in tokens.check_compatible(bsq_dim, levels, merge_unit, fingerprint, what="this decoder (bsq_encoder/)"):
        warnings.warn(w, stacklevel=3)


def token_grid(tokens: VisualTokens) -> tuple[int, int]:
    """(rows, cols) of the AR image's 16-px patch grid: one ``siglip_tensor`` entry each."""
    return tokens.ar_height // PIXELS_PER_PATCH, tokens.ar_width // PIXELS_PER_PATCH


@torch.no_grad()
def token_features(bsq_proj, tokens: VisualTokens, device) -> torch.Tensor:
    """``siglip_tensor`` (B, gh*gw, levels*Dv): raw ``bsq_output_proj*`` features, levels interleaved on the
    channel axis (channel ``c * levels + level``, upstream's stack(-1).flatten), raster 16-px patch order."""
    bits = tokens.bits().to(device)  # (B, N, levels, u, d), reference codec incl. the 64-bit quirk
    feats = bsq_proj.project(bits)  # levels x (B*N*u, Dv)
    x = torch.stack(feats, dim=-1).flatten(-2)  # (B*N*u, Dv*levels)
    b, m = tokens.batch_size, bsq_proj.cfg.spatial_merge_size
    rows, cols = tokens.grid  # merged-token grid (32-px cells)
    # tokens are 2x2 merge windows in raster order, sub-patches row-major -> raster order of 16-px patches
    x = x.view(b, rows, cols, m, m, x.shape[-1]).permute(0, 1, 3, 2, 4, 5).reshape(b, rows * cols * m * m, -1)
    return x


# ---------------------------------------------------------------------------------------------- noise, schedule
def reference_noise(shape, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.randn(shape)`` on the CPU from ``Generator('cpu').manual_seed(seed)`` in ``dtype`` (diffusers'
    ``randn_tensor`` with a CPU generator: one draw over the whole batch), so a seed gives the same image on any
    device and on both routes."""
    check_seed(seed)
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(int(s) for s in shape), generator=g, dtype=dtype)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    return steps


def dynamic_shift_mu(cfg: dict, image_seq_len: int) -> float:
    """diffusers' ``calculate_shift`` (only for schedulers with ``use_dynamic_shifting``; SD3.5-M has it off)."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def make_scheduler(scheduler_config: dict, steps: int, device="cpu", image_seq_len: int | None = None):
    """A fresh diffusers ``FlowMatchEulerDiscreteScheduler`` from the checkpoint's config, set to ``steps``.
    ``image_seq_len`` (latent patches) is needed only by schedulers with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_steps(steps)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise InputError("this checkpoint's scheduler shifts with the image size: give the latent size")
        kwargs["mu"] = dynamic_shift_mu(scheduler.config, image_seq_len)
    scheduler.set_timesteps(steps, device=device, **kwargs)
    return scheduler


def reference_sigmas(scheduler_config: dict, steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """The sigmas (``steps + 1`` values from 1 down to the final 0, float32, CPU) of the checkpoint's
    FlowMatchEuler schedule: what :meth:`UniARDecoder.decode` steps through (timestep = sigma x 1000)."""
    return make_scheduler(scheduler_config, steps, "cpu", image_seq_len).sigmas.detach().float().cpu().clone()


# ---------------------------------------------------------------------------------------------- sizes
def check_ratio(upsampling_ratio) -> float:
    r = upsampling_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise InputError(f"upsampling_ratio must be a number, got {r!r}")
    lo, hi = RATIO_RANGE
    if not lo <= r <= hi:
        raise InputError(f"upsampling_ratio must be between {lo:g} and {hi:g}, got {r:g}")
    return float(r)


def target_size(ar_height: int, ar_width: int, upsampling_ratio: float) -> tuple[int, int]:
    """Output size of the decoder (upstream: ``int(round(ar * ratio))``, Python rounding), validated."""
    r = check_ratio(upsampling_ratio)
    h, w = int(round(ar_height * r)), int(round(ar_width * r))
    if h % PIXELS_PER_PATCH or w % PIXELS_PER_PATCH:
        ok = [x / 8 for x in range(8, 17)
              if all(round(s * x / 8) % PIXELS_PER_PATCH == 0 for s in (ar_height, ar_width))]
        raise InputError(
            f"upsampling_ratio {r:g} turns the {ar_width}x{ar_height} tokens into {w}x{h} pixels; both sides must be "
            f"multiples of {PIXELS_PER_PATCH} (e.g. ratio {', '.join(f'{x:g}' for x in ok)})"
        )
    return h, w


def output_ratio(ar_size: tuple[int, int], out_size: tuple[int, int]) -> float | None:
    """The upsampling ratio that turns an AR image of ``ar_size`` (h, w) into ``out_size`` pixels, or None when
    no ratio in 1..2 does (as :func:`target_size` rounds)."""
    (ah, aw), (h, w) = ar_size, out_size
    for r in (h / ah, w / aw):
        if RATIO_RANGE[0] <= r <= RATIO_RANGE[1] and (int(round(ah * r)), int(round(aw * r))) == (h, w):
            return r
    return None


def max_output_side(dit, vae_scale: int) -> int:
    """The largest output side (pixels) the DiT's position table covers."""
    return dit.config.pos_embed_max_size * dit.config.patch_size * vae_scale


def check_output_size(ar_size: tuple[int, int], out_size: tuple[int, int], super_resolution: bool,
                      max_side: int) -> float:
    """Raise :class:`InputError` unless the decoder can turn tokens of an ``ar_size`` image into ``out_size``
    pixels (a ratio in 1..2, multiples of 16, within the DiT's position table; the error says which ratio or
    token size would fit).  -> the ratio."""
    (ah, aw), (h, w) = ar_size, out_size
    r = output_ratio(ar_size, out_size)
    if r is None or h % PIXELS_PER_PATCH or w % PIXELS_PER_PATCH:
        raise InputError(f"a {w}x{h} image is not an output size of the {aw}x{ah} tokens (it must be the token "
                         f"image size x an upsampling ratio of 1..2, both sides multiples of {PIXELS_PER_PATCH})")
    if not super_resolution and (h, w) != (ah, aw):
        raise InputError("this checkpoint's DiT has super_resolution off: only upsampling_ratio 1 works")
    if max(h, w) > max_side:
        side = max(ah, aw)
        if side > max_side:  # too large at any ratio: the tokens themselves must be smaller
            fix = f"the tokens alone are {aw}x{ah}: generate or encode at most {max_side} pixels per side"
        else:
            best = int(max_side / side * 4) / 4  # the ratio input moves in steps of 0.25
            fix = f"use upsampling_ratio {best:g} or less for these {aw}x{ah} tokens"
        raise InputError(f"output {w}x{h} exceeds the DiT's position table ({max_side} pixels per side); {fix}")
    return r


# ---------------------------------------------------------------------------------------------- conditioner
class TokenConditioner:
    """The parts of one checkpoint's decoder that turn tokens into the DiT's condition: the BSQ output
    projections (a few MB) and the decoder-prompt embeddings.  No DiT, no VAE: a host sampler brings those.

    ``features(tokens)`` is the ``siglip_tensor`` of the cond half; the uncond half is all zeros, as upstream."""

    def __init__(self, root: str, bsq_proj, fingerprint: str, device, dtype: torch.dtype, cache_dir=None):
        self.root, self.bsq_proj, self.fingerprint = root, bsq_proj, fingerprint
        self.device, self.dtype, self.cache_dir = torch.device(device), dtype, cache_dir
        c = bsq_proj.cfg
        self.bsq_dim, self.levels, self.merge_unit = c.bsq_dim, c.levels, c.merge_unit
        self.channels = c.levels * c.hidden_size
        self._embeddings: dict[str, PromptEmbeddings] = {}

    def features(self, tokens: VisualTokens, device=None) -> torch.Tensor:
        """The tokens' ``siglip_tensor`` in the conditioner's dtype, computed on ``device`` (default: where the
        projections are; they are moved there for the call and back, so a host may keep them offloaded)."""
        check_tokens(tokens, self.bsq_dim, self.levels, self.merge_unit, self.fingerprint)
        dev = torch.device(device) if device is not None else self.device
        if dev == self.device:
            return token_features(self.bsq_proj, tokens, dev).to(self.dtype)
        try:
            self.bsq_proj.to(dev)
            return token_features(self.bsq_proj, tokens, dev).to(self.dtype)
        finally:
            self.bsq_proj.to(self.device)

    def prompt(self, prompt: str | None = None) -> PromptEmbeddings:
        prompt = check_prompt(prompt)
        if prompt not in self._embeddings:
            self._embeddings[prompt] = prompt_embeddings(self.root, prompt, device=self.device, dtype=self.dtype,
                                                         cache_dir=self.cache_dir)
        return self._embeddings[prompt]


def load_conditioner(ckpt_or_path, device="auto", dtype="auto", ops=None, cache_dir=None) -> TokenConditioner:
    from ..runtime import resolve_device, resolve_dtype
    from . import components as C

    root = C.checkpoint_root(ckpt_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    bsq_proj, fingerprint = C.load_bsq_projections(root, dev, dt, ops)
    cache_dir = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else None
    return TokenConditioner(root, bsq_proj, fingerprint, dev, dt, cache_dir)
