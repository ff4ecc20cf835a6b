"""Loading the image-decoder parts of a UniAR checkpoint, each on its own, from safetensors only.

==============================  ==========================================================================
part                            files
==============================  ==========================================================================
BSQ output projections          ``bsq_encoder/config.json`` + the ``bsq_output_proj*`` tensors of
                                ``bsq_encoder/model.safetensors`` (never the rest of that vision tower)
DiT                             ``sd3_transformer/config.json`` + ``diffusion_pytorch_model.safetensors``
VAE                             ``sd3_pipeline/vae/config.json`` + ``diffusion_pytorch_model.safetensors``
schedule                        ``sd3_pipeline/scheduler/scheduler_config.json``
==============================  ==========================================================================

Every failure is a :class:`~uniar_backend.errors.CheckpointError` naming the missing or corrupt file.
diffusers is imported inside the functions only.
"""

from __future__ import annotations

import os

import torch

from ..checkpoint import WeightFiles, build_on_meta, load_module_weights
from ..config import VisionConfig, read_json
from ..errors import CheckpointError
from ..modeling.layers import resolve_ops
from ..modeling.vision import BSQOutputProjections

BSQ_DIR = "bsq_encoder"
TRANSFORMER_DIR = "sd3_transformer"
PIPELINE_DIR = "sd3_pipeline"
VAE_DIR = os.path.join(PIPELINE_DIR, "vae")
SCHEDULER_FILE = os.path.join(PIPELINE_DIR, "scheduler", "scheduler_config.json")


def checkpoint_root(ckpt_or_path) -> str:
    """A :class:`~uniar_backend.loader.Checkpoint` or a folder path -> absolute folder path.

    The decoder does not need the AR model's ``config.json``: a folder holding only ``bsq_encoder/``,
    ``sd3_transformer/`` and ``sd3_pipeline/`` is enough."""
    path = getattr(ckpt_or_path, "path", ckpt_or_path)
    try:
        path = os.path.abspath(os.fspath(path))
    except TypeError:
        raise CheckpointError(f"expected a checkpoint folder or Checkpoint, got {ckpt_or_path!r}") from None
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    return path


def _require_dir(root: str, rel: str, what: str) -> str:
    path = os.path.join(root, rel)
    if not os.path.isdir(path):
        raise CheckpointError(f"{root}: the image decoder needs {rel}/ ({what}), which is missing; "
                              "download the complete UniAR checkpoint")
    return path


# ---------------------------------------------------------------------------------------------- BSQ
def read_bsq_config(root: str) -> VisionConfig:
    folder = _require_dir(root, BSQ_DIR, "BSQ output projections")
    path = os.path.join(folder, "config.json")
    return VisionConfig.from_dict(read_json(path), path)


def bsq_fingerprint(files: WeightFiles) -> str:
    """The visual-codebook fingerprint, computed like ``Checkpoint.fingerprint`` but from ``bsq_encoder/`` (whose
    keys carry no ``model.visual.`` prefix), so tokens of the same codebook match."""
    return files.fingerprint(lambda k: k.startswith("bsq_output_proj") and (".norm." in k or "linear_fc1.weight" in k))


def read_bsq_fingerprint(root: str) -> str:
    """The codebook fingerprint of a checkpoint's ``bsq_encoder/`` (reads a few small tensors)."""
    read_bsq_config(root)
    return bsq_fingerprint(WeightFiles(os.path.join(root, BSQ_DIR), "model"))


def load_bsq_projections(root: str, device, dtype: torch.dtype, ops=None) -> tuple[BSQOutputProjections, str]:
    """The per-level ``bsq_output_proj*`` MLPs (codes -> raw vision features) and the codebook fingerprint."""
    cfg = read_bsq_config(root)
    folder = os.path.join(root, BSQ_DIR)
    files = WeightFiles(folder, "model")
    proj, layout = build_on_meta(lambda o: BSQOutputProjections(cfg, resolve_ops(o)), ops)
    # Only the keys of this module are read (load_module_weights reads exactly the module's layout keys).
    # Quirk: upstream always loads bsq_encoder/ in bfloat16 (load_bsq_image_tokenizer_and_transform), whatever
    # the pipeline dtype, so its weights are bf16-rounded.  We round them the same way, then compute in `dtype`
    # (upstream computes in bf16; with dtype=bfloat16 that is identical, with float32 it is the golden's setup).
    load_module_weights(proj, files, lambda k: k, torch.bfloat16, device, what="BSQ output projections",
                        layout=layout)
    proj.to(dtype)
    proj.eval().requires_grad_(False)
    return proj, bsq_fingerprint(files)


# ---------------------------------------------------------------------------------------------- DiT
def read_transformer_config(root: str) -> dict:
    folder = _require_dir(root, TRANSFORMER_DIR, "the SD3.5 DiT with the UniAR token-feature input")
    path = os.path.join(folder, "config.json")
    cfg = read_json(path)
    if not cfg.get("siglip_channels"):
        raise CheckpointError(f"{path}: no 'siglip_channels': this is a plain SD3 transformer, not UniAR's "
                              "SD3Transformer2DModelWithSigLIP")
    if cfg.get("add_siglip_tensor_to_latent", True) is not True:
        raise CheckpointError(f"{path}: add_siglip_tensor_to_latent is false, so the DiT would ignore the visual "
                              "tokens; this is not a UniAR image decoder")
    for key in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise CheckpointError(f"{path}: required integer field '{key}' is missing or invalid")
    return cfg


def load_transformer(root: str, device, dtype: torch.dtype, attention: str = "sdpa", weights: str | None = None,
                     compute_device=None, ops=None):
    """``sd3_transformer/`` -> :class:`~uniar_backend.decoder.sd3.UniARSD3Transformer` on ``device``, built from
    the layer namespace ``ops`` (e.g. ``comfy.ops``: ComfyUI streams and casts its Linears and its Conv2d).

    A folder stored quantised loads its quantised transformer-block Linears as they are; ``weights`` (int8 / fp8
    / int4) quantises a float folder while loading (:mod:`uniar_backend.quant`)."""
    from ..quant.files import resolve, view
    from ..quant.formats import check_device
    from ..quant.layers import DIT_TARGETS, quantize_modules
    from .sd3 import UniARSD3Transformer

    cfg = read_transformer_config(root)
    folder = os.path.join(root, TRANSFORMER_DIR)
    files = WeightFiles(folder, "diffusion_pytorch_model")
    fmt, stored = resolve(files, cfg, os.path.join(folder, "config.json"), weights)
    quantized: list[str] = []
    if fmt is not None:
        check_device(fmt, torch.device(compute_device or device))

    def quantize(m, twin):  # on the module and its plain twin: the same layer names
        quantized[:] = quantize_modules(m, DIT_TARGETS, fmt, dtype, like=twin)

    try:
        module, layout = build_on_meta(lambda o: UniARSD3Transformer(cfg, o), ops,
                                       post=quantize if fmt is not None else None)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: cannot build the SD3 transformer ({e})") from None
    load_module_weights(module, view(files, fmt, stored, quantized, loads=set(layout)), lambda k: k, dtype, device,
                        what="SD3 transformer", layout=layout)
    module.attention = attention
    module.eval().requires_grad_(False)
    module.weight_format = fmt.name if fmt is not None else None
    module.compact_positions()
    return module


# ---------------------------------------------------------------------------------------------- VAE
def read_vae_config(root: str) -> dict:
    folder = _require_dir(root, VAE_DIR, "the SD3 VAE")
    path = os.path.join(folder, "config.json")
    cfg = read_json(path)
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{path}: expected an AutoencoderKL, found {cfg.get('_class_name')!r}")
    for key in ("scaling_factor", "shift_factor"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise CheckpointError(f"{path}: '{key}' is missing (the SD3 VAE has scaling 1.5305, shift 0.0609)")
    if not isinstance(cfg.get("block_out_channels"), list) or not cfg["block_out_channels"]:
        raise CheckpointError(f"{path}: 'block_out_channels' is missing")
    return cfg


def load_vae(root: str, device, dtype: torch.dtype, attention: str = "sdpa", ops=None, part: str = "decoder"):
    """``sd3_pipeline/vae/`` -> one half of the VAE, built from ``ops``, on ``device``: ``part="decoder"``
    (:class:`~uniar_backend.decoder.vae.VAEDecoder`, what decoding needs) or ``"encoder"``
    (:class:`~uniar_backend.decoder.vae.VAEEncoder`, for a host's VAE Encode); the other half's tensors are not
    read."""
    from .vae import VAEDecoder, VAEEncoder

    cls = {"decoder": VAEDecoder, "encoder": VAEEncoder}[part]
    cfg = read_vae_config(root)
    folder = os.path.join(root, VAE_DIR)
    try:
        vae, layout = build_on_meta(lambda o: cls(cfg, o), ops)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: cannot build the VAE ({e})") from None
    load_module_weights(vae, WeightFiles(folder, "diffusion_pytorch_model"), lambda k: k, dtype, device,
                        what=f"VAE {part}", layout=layout)
    vae.set_attention(attention)
    vae.eval().requires_grad_(False)
    return vae


def latent_scale(root: str, transformer, vae) -> int:
    """Pixels per latent cell of a (DiT, VAE) pair, after checking that the VAE's latents are the DiT's."""
    if vae.config.latent_channels != transformer.config.in_channels:
        raise CheckpointError(f"{root}: VAE latent channels {vae.config.latent_channels} != DiT in_channels "
                              f"{transformer.config.in_channels}")
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------- all parts
def check_parts(root: str) -> dict:
    """Cheap pre-flight check of every decoder part: configs parsed, safetensors headers read and their data
    ranges checked against the file sizes (truncation).  Returns the scheduler config."""
    bcfg = read_bsq_config(root)
    WeightFiles(os.path.join(root, BSQ_DIR), "model")
    tcfg = read_transformer_config(root)
    if tcfg["siglip_channels"] != bcfg.levels * bcfg.hidden_size:
        raise CheckpointError(
            f"{root}: {TRANSFORMER_DIR}/config.json expects siglip_channels={tcfg['siglip_channels']} but "
            f"{BSQ_DIR}/ gives {bcfg.levels} levels x {bcfg.hidden_size}; the two folders do not belong together"
        )
    WeightFiles(os.path.join(root, TRANSFORMER_DIR), "diffusion_pytorch_model")
    read_vae_config(root)
    WeightFiles(os.path.join(root, VAE_DIR), "diffusion_pytorch_model")
    return read_scheduler_config(root)


# ---------------------------------------------------------------------------------------------- schedule
def read_scheduler_config(root: str) -> dict:
    path = os.path.join(root, SCHEDULER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{root}: the image decoder needs {SCHEDULER_FILE} (the flow-matching schedule), "
                              "which is missing")
    cfg = read_json(path)
    if cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise CheckpointError(f"{path}: expected FlowMatchEulerDiscreteScheduler, found {cfg.get('_class_name')!r}")
    return cfg
