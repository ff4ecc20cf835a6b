"""``python -m uniar_backend``: tokenize, generate, caption (and decode, t2i from the decoder side).

Errors exit non-zero with one clear line on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from .cli_common import add_generate_args, load_components, run_generate, terminal_progress
from .errors import UniARError, is_out_of_memory
from .limits import ATTENTION_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES, IMAGE_FORMATS
from .quant import FORMATS as WEIGHT_FORMATS


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default: auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights/compute dtype (default auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel (auto: flash_attention_2 when importable on CUDA, else sdpa)")
    g.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                   help="quantise a float checkpoint's LLM / generation-head / DiT Linears while loading (a folder "
                        "converted with `quantize` loads as stored without this)")
    return p


TOKEN_SUFFIXES = (".safetensors",)
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)
# what each command writes: (argument, suffixes that name its format; () = any)
OUTPUTS = {"tokenize": (("out", TOKEN_SUFFIXES),), "generate": (("out", TOKEN_SUFFIXES),),
           "caption": (("out", ()),), "decode": (("out", IMAGE_SUFFIXES),),
           "t2i": (("out", IMAGE_SUFFIXES), ("save_tokens", TOKEN_SUFFIXES))}
# input files each command reads (checked before any weights load)
INPUTS = (("image", "image file"), ("tokens", "visual tokens file"), ("image_tokens", "visual tokens file"),
          ("prompt_file", "prompt file"), ("question_file", "question file"))
MAX_TEXT_FILE = 1 << 20  # a prompt or question file is read whole; beyond any context anyway


def precheck_files(args) -> None:
    """Every destination and input file of the command, before anything heavy: a bad --out fails in a second,
    not after a whole generation."""
    from .fileio import check_input_file, check_output_file

    for name, what in INPUTS:
        if getattr(args, name, None) is not None:
            check_input_file(getattr(args, name), what)
    for name, suffixes in OUTPUTS.get(args.command, ()):
        if getattr(args, name, None) is not None:
            check_output_file(getattr(args, name), "--" + name.replace("_", "-"), suffixes)
    for name in ("prompt", "question"):
        src = getattr(args, name + "_file", None)
        if src is not None:
            setattr(args, name, read_text_file(src, f"--{name}-file"))


def read_text_file(path: str, what: str) -> str:
    from .errors import InputError

    if os.path.getsize(path) > MAX_TEXT_FILE:
        raise InputError(f"{what} {path} is larger than {MAX_TEXT_FILE >> 10} KiB; no prompt that long fits the model")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None


def cmd_tokenize(args):
    from .preprocess import load_image

    image = load_image(args.image)
    tokens = load_components(args, ("vision",)).encode(image)
    tokens.save(args.out)
    print(f"{args.out}: {tokens.batch_size} x {tokens.indices.shape[1]} tokens "
          f"({tokens.ar_height}x{tokens.ar_width} px, bsq_dim {tokens.bsq_dim})")


def cmd_generate(args):
    tokens = run_generate(args)
    tokens.save(args.out)
    print(f"{args.out}: {tokens.batch_size} x {tokens.indices.shape[1]} tokens ({tokens.ar_height}x{tokens.ar_width} px)")


def cmd_caption(args):
    from .preprocess import load_image
    from .tokens import VisualTokens

    from .api import check_caption_args

    check_caption_args(args.question, args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.top_k,
                       args.seed)
    image = load_image(args.image) if args.image else None
    tokens = VisualTokens.load(args.tokens) if args.tokens else None
    components = ("llm", "lm_head") + (("vision",) if image is not None else ())
    answers = load_components(args, components).caption(args.question, image=image, tokens=tokens, max_new_tokens=args.max_new_tokens,
                          do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
    text = "\n".join(answers)
    print(text)
    if args.out:
        _write_text(args.out, text)


def cmd_download(args):
    from . import download
    from .errors import InputError

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file; give the checkpoint folder to create or complete")
    files = download.plan(download.list_files(args.repo, args.revision)) if args.dry_run else None
    if args.dry_run:
        for f in files:
            print(f"{f.size:>14,d}  {f.path}")
        print(f"{len(files)} files, {sum(f.size for f in files) / 1e9:.2f} GB")
        return 0
    summary = download.download(args.repo, args.out, args.revision, verify=args.verify,
                                progress=terminal_progress("download", in_bytes=True))
    print(f"{args.out}: {summary['files']} files, {summary['bytes'] / 1e9:.2f} GB ({summary['fetched']} fetched, "
          f"{summary['skipped']} already there)")
    return 0


def cmd_quantize(args):
    from .quant.convert import convert

    summary = convert(args.model, args.format, args.out, progress=terminal_progress("quantize", in_bytes=True))
    print(f"{args.out}: {summary['format']}, {summary['layers']} layers quantised, {summary['bytes'] / 1e9:.2f} GB "
          f"(from {summary['source_bytes'] / 1e9:.2f} GB)")
    return 0


def cmd_memory(args):
    import json

    from .memory import report

    r = report(args.format)
    if args.json:
        print(json.dumps(r))
    else:
        from .memory import markdown

        print(markdown(r))
    return 0


def _write_text(path, text):
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(prog="python -m uniar_backend",
                                     description="UniAR inference: tokenize, generate, caption, decode, t2i, batch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", parents=[common], help="image -> visual tokens (.safetensors)")
    p.add_argument("--model", required=True, help="UniAR checkpoint folder")
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--out", required=True, help="output tokens file (.safetensors)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("generate", parents=[common], help="prompt (+ optional edit image/tokens) -> visual tokens")
    p.add_argument("--model", required=True, help="UniAR checkpoint folder")
    add_generate_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="edit mode: input image file")
    src.add_argument("--image-tokens", help="edit mode: input given as visual tokens (no re-encoding)")
    p.add_argument("--out", required=True, help="output tokens file (.safetensors)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("caption", parents=[common], help="answer a question about an image or visual tokens")
    p.add_argument("--model", required=True, help="UniAR checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="input image file")
    src.add_argument("--tokens", help="input visual tokens file")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="question / instruction")
    q.add_argument("--question-file", help="read the question from this UTF-8 text file")
    p.add_argument("--max-new-tokens", type=int, default=256, help="maximum answer length (default 256)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --do-sample)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (with --do-sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed (with --do-sample)")
    p.add_argument("--out", help="also write the answer to this text file (UTF-8)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("download", help="fetch a checkpoint from the Hugging Face Hub: only the files this pack reads",
                       description="Downloads the files the UniAR loaders read (about 26 of the repository's 74 GB: "
                                   "see README), resuming interrupted files, after checking the free disk space.")
    p.add_argument("--repo", default="ShareLab-SII/UniAR-SFT", help="Hub repository (default ShareLab-SII/UniAR-SFT)")
    p.add_argument("--out", required=True, help="checkpoint folder to create or complete, e.g. models/uniar/UniAR-SFT")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    p.add_argument("--verify", action="store_true", help="check every file against the Hub's sha256 / git hash")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be fetched, with sizes")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("quantize", help="convert a float checkpoint folder to int8 / fp8 / int4 weights",
                       description="Writes a complete checkpoint folder (same layout) whose LLM, generation-head and "
                                   "DiT Linears are stored in the format (core ComfyUI's key layout); one tensor at a "
                                   "time, atomically (DST appears only when complete).")
    p.add_argument("--model", required=True, help="float (bf16) UniAR checkpoint folder")
    p.add_argument("--format", required=True, choices=WEIGHT_FORMATS, help="weight format")
    p.add_argument("--out", required=True, help="new folder for the converted checkpoint")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("memory", help="bytes per part and peak memory of the real model per weight format (no weights "
                                      "needed)")
    p.add_argument("--format", default="bf16", choices=("bf16",) + WEIGHT_FORMATS, help="weight format (default bf16)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=cmd_memory)

    try:
        from . import cli_decode
    except ImportError:
        cli_decode = None
    if cli_decode is not None:
        cli_decode.register(sub, common)
    from . import batch

    batch.register(sub, common)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``torchrun`` stopping its workers) unwinds like Ctrl-C, so atomic
    writes and the converter's partial folder are cleaned up instead of left behind."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        precheck_files(args)
        rc = args.func(args)
    except UniARError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory ({_first_line(e)}); use a smaller size or batch, dtype bfloat16, or free memory",
              file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


if __name__ == "__main__":
    sys.exit(main())
