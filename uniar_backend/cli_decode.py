"""Command-line sub-commands of the image decoder: ``decode`` (tokens file -> PNG) and ``t2i`` (prompt -> PNG).

The main CLI (``python -m uniar_backend``) calls :func:`register` with its sub-parsers and a parent parser that
carries ``--device/--dtype/--attention``; each sub-command stores its handler as ``func`` (``args.func(args)``
returns the exit status).  Errors are :class:`~uniar_backend.errors.UniARError` subclasses with a one-line
message; :func:`main` (``python -m uniar_backend.cli_decode ...``) prints them on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import gc
import sys

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
    q.add_argument("--prompt", required=True, help="text prompt")
    q.add_argument("--height", type=int, required=True, help="AR image height, a multiple of 32")
    q.add_argument("--width", type=int, required=True, help="AR image width, a multiple of 32")
    q.add_argument("--cfg", type=float, default=1.5, help="AR classifier-free guidance (default 1.5)")
    q.add_argument("--temperature", type=float, default=1.0, help="AR sampling temperature (default 1.0)")
    q.add_argument("--seed", type=int, default=0, help="seed of the AR sampling and of the decoder noise (default 0)")
    q.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
    _add_decode_flags(q, seed=False)
    q.add_argument("--save-tokens", default=None, help="also write the generated visual tokens to this file")
    q.add_argument("--out", required=True, help="output PNG path (a batch writes OUT_00000.png ...)")
    q.set_defaults(func=cmd_t2i)


# ---------------------------------------------------------------------------------------------- handlers
def _progress(label: str):
    if not sys.stderr.isatty():
        return None

    def cb(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label} {done}/{total}", end=end, file=sys.stderr, flush=True)

    return cb


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
                       cache_dir=args.cache_dir, decoder_prompt=args.decoder_prompt)
    images = dec.decode(tokens, steps=args.steps, guidance=args.guidance, upsampling_ratio=args.upsampling_ratio,
                        seed=seed, decoder_prompt=args.decoder_prompt, callback=_progress("decode step"))
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
    import torch

    from .decoder import target_size
    from .errors import InputError
    from .loader import Checkpoint

    if args.batch_size < 1 or args.batch_size > 64:
        raise InputError(f"--batch-size must be in 1..64, got {args.batch_size}")
    _precheck(args.model, None, args)
    target_size(args.height, args.width, args.upsampling_ratio)  # fail before the AR run, not after it

    from .api import generate

    ckpt = Checkpoint(args.model)
    model = ckpt.load_ar(components=("llm", "vision", "gen_head"), device=args.device, dtype=args.dtype,
                         attention=args.attention)
    try:
        tokens = generate(model, ckpt, prompts=[args.prompt] * args.batch_size, height=args.height,
                          width=args.width, cfg=args.cfg, temperature=args.temperature, seed=args.seed,
                          callback=_progress("AR step"))
    finally:
        # Free the AR model before the decoder is loaded: peak memory = max(AR, decoder), not the sum.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.save_tokens:
        tokens.save(args.save_tokens)
    for path in _decode_and_save(ckpt.path, tokens, args, args.seed):
        print(path)
    return 0


# ---------------------------------------------------------------------------------------------- standalone
def common_parser() -> argparse.ArgumentParser:
    """The ``--device/--dtype/--attention`` parent parser (the main CLI has its own, with the same options)."""
    from .loader import DEVICE_CHOICES, DTYPE_CHOICES
    from .modeling.layers import ATTENTION_CHOICES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help=f"{' / '.join(DEVICE_CHOICES)} (default auto)")
    common.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (default auto)")
    common.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                        help="attention kernel (default auto)")
    return common


def main(argv=None) -> int:
    from .errors import UniARError

    parser = argparse.ArgumentParser(prog="python -m uniar_backend.cli_decode",
                                     description="UniAR image decoder (decode / t2i)")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub, common_parser())
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UniARError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
