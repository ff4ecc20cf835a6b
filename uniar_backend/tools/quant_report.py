"""Error and speed of the weight formats on a checkpoint with the real model's proportions (random weights: a
proxy for the real model's errors, not a measurement of them).

    python -m uniar_backend.tools.quant_report [--steps 64] [--json]

Per format (int8, fp8, int4) against the float32 model, same run:

* weight relative error ||W_q - W|| / ||W|| of the quantised parts (LLM decoder layers, generation-head stack,
  DiT transformer blocks);
* LLM: cosine and KL(p_float || p_q) of the next-token distribution over a 96-token random prompt (lm_head);
* generation head: mean |dp| of the bit probabilities of the first AR step (2 CFG rows x 1024 bits);
* t2i: bit agreement of the tokens drawn at the same seed (``--steps`` tokens, fast sampler), over the first
  token and over all (once one bit differs the sequences diverge: the later tokens are other samples);
* caption: greedy token agreement over 64 new tokens (the uniar-tiny fixture: it has the tokenizer);
* DiT: relative error of one decode (the uniar-tiny fixture's DiT, 4 steps, same noise);
* speed: ms per AR step (fast sampler, CPU) and ms per DiT step, each format / float32 (``--speed-dtype
  bfloat16``: also against bf16 weights, everything computing in bf16).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from ..quant import FORMATS
from ..quant.layers import AR_TARGETS, QuantLinear, quantize_loaded
from . import synthetic
from .bench import grid_for, make_prefix, timed_run, window_ms

FIXTURE = os.environ.get("UNIAR_FIXTURE", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                                        "fixtures", "uniar-tiny"))


def _weight_error(fm, qm, prefix: str) -> float:
    num = den = 0.0
    for name, q in qm.named_modules():
        if isinstance(q, QuantLinear) and name.startswith(prefix):
            w = fm.get_submodule(name).weight.float()
            num += (q.dequantized(torch.float32) - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    return (num / den) ** 0.5 if den else float("nan")


def llm_logits(m, ids):
    """Logits (float32, every position) of the model's LLM + lm_head over the prompt ``ids`` (1, T) (no image)."""
    from ..modeling.text import run_layers

    lm = m.language_model
    x = lm.embed_tokens(ids)
    t = ids.shape[1]
    pos = torch.arange(t).view(1, 1, t).expand(3, 1, t)
    cos, sin = m.rope(pos, x.dtype)
    h = lm.norm(run_layers(lm.layers, x, cos, sin, None, None, "sdpa"))
    return m.lm_head(h).float()


def _ar_part(args, out):
    cfg = synthetic.proportionate_config()
    base = synthetic.random_model(cfg, ("llm", "vision", "lm_head", "gen_head"), "cpu", torch.float32, seed=args.seed)
    ids = torch.randint(0, cfg.text.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
    prefix = make_prefix(base, *grid_for(args.steps), seed=args.seed)
    with torch.inference_mode():
        ref_logits = llm_logits(base, ids)[:, -1]
        ref_bits, marks, _, _ = timed_run(base, prefix, "fast", seed=args.seed, logits_out=(ref_out := []))
    shape = (cfg.vision.levels, cfg.vision.merge_unit, cfg.vision.bsq_dim)
    ref_step = {"float32": window_ms(marks, False)}
    for fmt in FORMATS:
        qm = copy.deepcopy(base)
        quantize_loaded(qm, AR_TARGETS, fmt)
        with torch.inference_mode():
            lq = llm_logits(qm, ids)[:, -1]
            bits, marks, _, _ = timed_run(qm, prefix, "fast", seed=args.seed, logits_out=(q_out := []))
            # the same model again, for a same-run float32 timing next to each format (interleaved)
            _, fmarks, _, _ = timed_run(base, prefix, "fast", seed=args.seed)
        p, q = ref_logits.softmax(-1), lq.softmax(-1)
        bp = [torch.cat([o.view(-1, *shape, 2) for o in outs[:1]]).softmax(-1)[..., 1] for outs in (ref_out, q_out)]
        r = out.setdefault(fmt, {})
        r["weight_rel_error_llm"] = _weight_error(base, qm, "model.language_model.")
        r["weight_rel_error_gen_head"] = _weight_error(base, qm, "visual_decoder.")
        r["llm_logits_cosine"] = torch.nn.functional.cosine_similarity(lq, ref_logits).item()
        r["llm_kl"] = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum().item()
        r["gen_bit_prob_mean_abs_diff"] = (bp[0] - bp[1]).abs().mean().item()
        r["t2i_first_token_bit_agreement"] = (bits[:, 0] == ref_bits[:, 0]).float().mean().item()
        r["t2i_bit_agreement"] = (bits == ref_bits).float().mean().item()
        r["ms_per_ar_step"] = window_ms(marks, False)
        r["ar_step_ratio_vs_float32"] = window_ms(fmarks, False) / window_ms(marks, False)
    out["float32"] = {"ms_per_ar_step": ref_step["float32"]}


def _fixture_part(args, out):
    from ..api import UniAR
    from ..decoder import load_decoder
    from ..preprocess import load_image

    img = os.path.join(os.path.dirname(FIXTURE), "golden", "test_image.png")
    base = UniAR.load(FIXTURE, device="cpu", dtype="float32")
    info = {}
    base.caption("Describe the image in detail.", image=load_image(img), max_new_tokens=64, info=info)
    ref_ids = info["output_ids"][0]
    tokens = base.generate(["A red cube on a blue table."], 64, 64, cfg=1.5, seed=1)
    dec = load_decoder(FIXTURE, device="cpu", dtype="float32")
    dec.decode(tokens, steps=1, seed=0)  # warm-up (first-call costs) before any timing
    t0 = time.perf_counter()
    ref_img = dec.decode(tokens, steps=4, seed=0)
    f_ms = (time.perf_counter() - t0) / 4 * 1e3
    for fmt in FORMATS:
        q = UniAR.load(FIXTURE, device="cpu", dtype="float32", weights=fmt)
        qi = {}
        q.caption("Describe the image in detail.", image=load_image(img), max_new_tokens=64, info=qi)
        ids = qi["output_ids"][0]
        n = max(len(ids), len(ref_ids))
        same = sum(1 for a, b in zip(list(ids), list(ref_ids)) if a == b)
        qd = load_decoder(FIXTURE, device="cpu", dtype="float32", weights=fmt)
        qd.decode(tokens, steps=1, seed=0)
        t0 = time.perf_counter()
        im = qd.decode(tokens, steps=4, seed=0)
        q_ms = (time.perf_counter() - t0) / 4 * 1e3
        r = out.setdefault(fmt, {})
        r["weight_rel_error_dit"] = _weight_error(dec.transformer, qd.transformer, "transformer_blocks.")
        r["caption_greedy_agreement_64"] = same / n if n else 1.0
        r["dit_decode_rel_error"] = ((im - ref_img).norm() / ref_img.norm()).item()
        r["dit_decode_max_levels"] = (im - ref_img).abs().max().item() * 255
        r["ms_per_decode_step"] = q_ms
        r["decode_step_ratio_vs_float32"] = f_ms / q_ms
    out.setdefault("float32", {})["ms_per_decode_step"] = f_ms


def _speed(args, out, dtype_name: str):
    """ms per AR step and per DiT step with the weights in each format against the float weights, all computing
    in ``dtype_name`` (interleaved in one run)."""
    from ..decoder import load_decoder

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    cfg = synthetic.proportionate_config()
    base = synthetic.random_model(cfg, ("llm", "vision", "gen_head"), "cpu", dt, seed=args.seed)
    prefix = make_prefix(base, *grid_for(args.steps), seed=args.seed)
    dec = load_decoder(FIXTURE, device="cpu", dtype=dtype_name) if os.path.isdir(FIXTURE) else None
    tokens = None
    if dec is not None:
        from ..api import UniAR

        tokens = UniAR.load(FIXTURE, ("llm", "gen_head"), device="cpu", dtype="float32").generate(
            ["A red cube on a blue table."], 64, 64, cfg=1.5, seed=1)

    def dit_ms(d):
        d.decode(tokens, steps=1, seed=0)  # warm-up
        t0 = time.perf_counter()
        d.decode(tokens, steps=4, seed=0)
        return (time.perf_counter() - t0) / 4 * 1e3

    for fmt in FORMATS:
        qm = copy.deepcopy(base)
        quantize_loaded(qm, AR_TARGETS, fmt)
        with torch.inference_mode():
            timed_run(qm, prefix, "fast", seed=args.seed)  # warm-up
            _, qmarks, _, _ = timed_run(qm, prefix, "fast", seed=args.seed)
            _, fmarks, _, _ = timed_run(base, prefix, "fast", seed=args.seed)
        r = out.setdefault(fmt, {})
        r[f"ms_per_ar_step_{dtype_name}"] = window_ms(qmarks, False)
        r[f"ar_step_ratio_vs_{dtype_name}"] = window_ms(fmarks, False) / window_ms(qmarks, False)
        if dec is not None:
            q_ms = dit_ms(load_decoder(FIXTURE, device="cpu", dtype=dtype_name, weights=fmt))
            r[f"decode_step_ratio_vs_{dtype_name}"] = dit_ms(dec) / q_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uniar_backend.tools.quant_report", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=64, help="AR tokens for the t2i agreement and timing (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--speed-dtype", choices=("bfloat16",), default=None,
                   help="also time every format against float weights computing in this dtype")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out: dict = {}
    _ar_part(args, out)
    if os.path.isdir(FIXTURE):
        _fixture_part(args, out)
    if args.speed_dtype:
        _speed(args, out, args.speed_dtype)
    if args.json:
        print(json.dumps(out))
        return 0
    keys = [k for k in out["int8"]]
    print("| metric | " + " | ".join(FORMATS) + " |")
    print("|---|" + "---:|" * len(FORMATS))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{out[f][k]:.4g}" for f in FORMATS) + " |")
    print(f"| float32 ms per AR step / DiT step | {out['float32']['ms_per_ar_step']:.3g} / "
          f"{out['float32'].get('ms_per_decode_step', float('nan')):.3g} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
