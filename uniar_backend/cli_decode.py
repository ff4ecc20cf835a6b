"""Command-line sub-commands of the image decoder: ``decode`` (tokens file -> PNG) and ``t2i`` (prompt -> PNG).

The main CLI (``python -m uniar_backend``) calls :func:`register` with its sub-parsers and a parent parser that
carries ``--device/--dtype/--attention``; each sub-command stores its handler as ``func`` (``args.func(args)``
returns the exit status).  Errors are :class:`~uniar_backend.errors.UniARError` subclasses with a one-line
message, which the main CLI prints on stderr (exit status 2).
"""

from __future__ import annotations

import argparse
import gc

from .cli_common import add_generate_args, run_generate, terminal_progress

DEFAULTS = {"steps": 28, "guidance": 1.5, "upsampling_ratio": 1.0, "seed": 0}


def _add_decode_flags(p: argparse.ArgumentParser, seed: bool = True) -> None:
    g = p.add_argument_group("image decoder")
    g.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="denoising steps (default 28)")
    g.add_argument("--guidance", type=float, default=DEFAULTS["guidance"],
                   help="decoder classifier-free guidance; <= 1 disables it (default 1.5)")
    g.add_argument("--upsampling-ratio", type=float, default=DEFAULTS["upsampling_ratio"],
                   help="output size / token-grid size, 1..2; the output sides must be multiples of 16 (default 1)")
    if seed:
        g.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="decoder noise seed (default 0)")
    g.add_argument("--decoder-prompt", default=None,
                   help="decoder text prompt (default: UniAR's constant reconstruction prompt); a new prompt is "
                        "encoded once with the checkpoint's text encoders and cached")
    g.add_argument("--cache-dir", default=None,
                   help="folder for the cached decoder-prompt embeddings (default: <model>/.uniar_cache when "
                        "writable, else ~/.cache/uniar/...)")


def register(subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``decode`` and ``t2i`` sub-commands."""
    p = subparsers.add_parser(
        "decode", parents=[common], help="decode a visual-tokens file to PNG",
        description="Decode UniAR visual tokens (.safetensors from tokenize / t2i / edit) to images with the "
                    "checkpoint's SD3.5 decoder. A batch of B token grids writes OUT_00000.png ... OUT_{B-1}.")
    p.add_argument("--model", required=True, help="UniAR checkpoint folder")
    p.add_argument("--tokens", required=True, help="visual tokens .safetensors file")
    _add_decode_flags(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=cmd_decode)

    q = subparsers.add_parser(
        "t2i", parents=[common], help="text -> image (AR tokens, then the SD3.5 decoder)",
        description="Generate visual tokens for a prompt with the AR model, free it, then decode them to PNG.")
    q.add_argument("--model", required=True, help="UniAR checkpoint folder")
    add_generate_args(q)  # the generate flags; --seed seeds the AR sampling and the decoder noise
    _add_decode_flags(q, seed=False)
    q.add_argument("--save-tokens", default=None, help="also write the generated visual tokens to this file")
    q.add_argument("--out", required=True, help="output PNG path (a batch writes OUT_00000.png ...)")
    q.set_defaults(func=cmd_t2i)


# ---------------------------------------------------------------------------------------------- handlers
def _precheck(model_dir: str, tokens, args) -> None:
    """Everything that can be checked from config files, before any weights are read."""
    from .decoder import check_decode_args, target_size
    from .decoder.components import checkpoint_root, read_bsq_config

    check_decode_args(args.steps, args.guidance, args.seed)
    if tokens is not None:
        bcfg = read_bsq_config(checkpoint_root(model_dir))
        tokens.check_compatible(bcfg.bsq_dim, bcfg.levels, bcfg.merge_unit, what=f"the decoder of {model_dir}")
        target_size(tokens.ar_height, tokens.ar_width, args.upsampling_ratio)


def _decode_and_save(model_dir: str, tokens, args, seed: int) -> list[str]:
    from .decoder import load_decoder, save_images

    dec = load_decoder(model_dir, device=args.device, dtype=args.dtype, attention=args.attention,
                       cache_dir=args.cache_dir, decoder_prompt=args.decoder_prompt,
                       weights=getattr(args, "weights", None))
    images = dec.decode(tokens, steps=args.steps, guidance=args.guidance, upsampling_ratio=args.upsampling_ratio,
                        seed=seed, decoder_prompt=args.decoder_prompt, callback=terminal_progress("decode", unit="step"))
    meta = {"uniar": f"steps={args.steps} guidance={args.guidance} upsampling_ratio={args.upsampling_ratio} "
                     f"seed={seed}"}
    return save_images(images, args.out, metadata=meta)


def cmd_decode(args) -> int:
    from .tokens import VisualTokens

    tokens = VisualTokens.load(args.tokens)
    _precheck(args.model, tokens, args)
    for path in _decode_and_save(args.model, tokens, args, args.seed):
        print(path)
    return 0


def cmd_t2i(args) -> int:
    from .decoder import target_size

    _precheck(args.model, None, args)
    target_size(args.height, args.width, args.upsampling_ratio)  # fail before the AR run, not after it
    # The AR model lives only inside run_generate: it is freed before the decoder is loaded, so the peak memory
    # is max(AR, decoder), not the sum.
    tokens = run_generate(args, edit=False, progress_label="AR step")
    gc.collect()
    _empty_device_cache()
    if args.save_tokens:
        tokens.save(args.save_tokens)
    for path in _decode_and_save(args.model, tokens, args, args.seed):
        print(path)
    return 0


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
