"""Pieces shared by the CLI's sub-commands (``cli.py``) and the decoder's (``cli_decode.py``): generation flags,
the generate run and the terminal progress line.  Both command modules import this one; neither imports the
other's handlers, so the CLI has no import circle (``cli.py`` -> ``cli_decode.py`` -> ``cli_common.py``)."""

from __future__ import annotations

import argparse
import sys

from .sampling import IMAGE_SAMPLERS  # the sampler registry (torch-free)


def load_components(args, components):
    """The AR model (:class:`~uniar_backend.api.UniAR`) with only ``components``, as the command's flags say."""
    from .api import UniAR

    return UniAR.load(args.model, components, device=args.device, dtype=args.dtype, attention=args.attention,
                      weights=getattr(args, "weights", None))


def add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt ('' gives an unconditional sample)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file (for long prompts)")
    p.add_argument("--height", type=int, required=True, help="AR image height in pixels (multiple of 32)")
    p.add_argument("--width", type=int, required=True, help="AR image width in pixels (multiple of 32)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--mode", default="fast", choices=tuple(IMAGE_SAMPLERS),
                   help="sampler: fast (default) or the reference loop (same tokens, slower)")


def run_generate(args, edit: bool = True, progress_label: str = "generate"):
    """Validate, load only the components needed, generate; the model is freed when this returns."""
    from .api import check_generate_args
    from .errors import InputError
    from .preprocess import load_image
    from .tokens import VisualTokens

    if not 1 <= args.batch_size <= 64:
        raise InputError(f"--batch-size must be in 1..64, got {args.batch_size}")
    image = getattr(args, "image", None) if edit else None
    check_generate_args([args.prompt] * args.batch_size, args.height, args.width, args.cfg, args.temperature,
                        args.seed, args.mode, (args.height, args.width) if image else None)
    edit_tokens = getattr(args, "image_tokens", None) if edit else None
    edit_images = [load_image(image)] if image else None
    tokens_in = VisualTokens.load(edit_tokens) if edit_tokens else None
    components = ("llm", "gen_head") + (("vision",) if edit_images else ())
    ar = load_components(args, components)
    progress = terminal_progress(progress_label)
    return ar.generate([args.prompt] * args.batch_size, args.height, args.width, cfg=args.cfg,
                        temperature=args.temperature, seed=args.seed, edit_images=edit_images,
                        edit_tokens=tokens_in, mode=args.mode, callback=progress)


def terminal_progress(label):
    """A progress callback printing to a terminal's stderr (None when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        return None

    def cb(i, n):
        sys.stderr.write(f"\r{label}: {i}/{n}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return cb
