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
    progress = terminal_progress(progress_label, unit="token")
    return ar.generate([args.prompt] * args.batch_size, args.height, args.width, cfg=args.cfg,
                        temperature=args.temperature, seed=args.seed, edit_images=edit_images,
                        edit_tokens=tokens_in, mode=args.mode, callback=progress)


def terminal_progress(label, unit: str = "step", in_bytes: bool = False):
    """A ``callback(done, total)`` drawing a tqdm bar (count, rate, elapsed and ETA) on a terminal's stderr; None
    when stderr is not a terminal (logs and pipes get no bar, as before).  ``in_bytes``: ``done`` / ``total`` are
    bytes (downloads, conversions), shown as KiB / MiB / GiB and their rate."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # a dependency of transformers and huggingface_hub; imported only for a terminal

    width = bar_size()
    state: dict = {}

    def cb(done, total):
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=label, unit="B" if in_bytes else unit, unit_scale=in_bytes,
                                      unit_divisor=1024 if in_bytes else 1000, file=sys.stderr, initial=done,
                                      mininterval=0.2, **width)
        if total != bar.total:
            bar.total = total
        bar.update(done - bar.n)
        if done >= total and not state.get("closed"):
            state["closed"] = True
            bar.close()

    return cb


def bar_size() -> dict:
    """tqdm's size options for stderr's terminal: follow its width, or 100 x 24 where it reports none (a bare
    pseudo-terminal says 0 x 0, which would draw no bar at all)."""
    import os

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 24}
