"""Speed against the upstream UniAR code (ShareLab-SII/UniAR), same process, same random weights, same inputs.

    PYTHONPATH=<transformers 4.57 environment> <python with torch + torchvision> scripts/bench_upstream.py \\
        --upstream <checkout of ShareLab-SII/UniAR> [--steps 256] [--new 64] [--repeats 2]

The upstream code runs in its own environment (transformers 4.57, the version it pins); its package ``uniar`` is
imported from ``--upstream`` (nothing of it is in this repository).  A checkpoint with the benchmark's proportionate
configuration (random weights, ``uniar_backend.tools.synthetic``; tokenizer files from the fixture) is written to a
temporary folder and loaded by both, in float32 on the CPU with one thread and sdpa attention:

* t2i: upstream ``prepare_visual_inputs`` + ``generate_visual`` (cfg 1.5) against ``UniAR.generate`` (fast
  sampler), N = ``--steps`` tokens; the tokens must be identical.  On the CPU upstream's ``visual_decoder`` layers
  cannot take its 2-D padding mask (sdpa raises), so it is expanded at run time to the 4-D mask flash-attention
  applies (key j visible to query i iff j <= i and j is not padding), and its bfloat16 cast of the BSQ codes is
  undone for the float32 run, as for the goldens (fixtures README).
* caption: upstream's chat flow (``apply_chat_template`` + ``generate``, greedy) against ``UniAR.caption``, on the
  fixture's test image, ``--new`` tokens; the answers must be identical.
* decode: upstream ``UniARVisualDecoder.decode`` against ``UniARDecoder.decode`` on the uniar-tiny fixture (its
  small DiT, VAE and text encoders), tokens of a 64x64 t2i, ratio 2, ``--decode-steps`` steps, guidance 1.5,
  seed 0; the images must agree within 1 level of 255.  Upstream encodes the decoder prompt with its three text
  encoders on every call; ours reads the embeddings cached at load time.

Prints seconds for both and the ratio upstream / ours (nothing asserts on time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")


def _expand_mask(model):
    """Upstream's ``visual_transformer_pred`` with its 2-D mask turned into the 4-D causal + padding mask."""
    import torch

    original = model.visual_transformer_pred

    def patched(hidden_states, attention_mask=None, **kw):
        if attention_mask is not None and attention_mask.dim() == 2:
            T = hidden_states.shape[-2]
            keys = attention_mask.bool()[:, None, None, -T:]
            causal = torch.ones(T, T, dtype=torch.bool, device=keys.device).tril()
            attention_mask = causal[None, None] & keys
        return original(hidden_states, attention_mask=attention_mask, **kw)

    model.visual_transformer_pred = patched
    # upstream hard-casts BSQ codes to bfloat16 before bsq_output_proj*; in a float32 run they are cast back to the
    # module's dtype (lossless: the codes are +-1/sqrt(bsq_dim)), as for the goldens
    for name, mod in model.named_modules():
        if name.split(".")[-1].startswith("bsq_output_proj"):
            dt = next(mod.parameters()).dtype
            mod.register_forward_pre_hook(
                lambda m, args, dt=dt: tuple(x.to(dt) if torch.is_tensor(x) and x.is_floating_point() else x
                                             for x in args))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="a checkout of ShareLab-SII/UniAR (its uniar/ and inference/)")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=28)
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.abspath(a.upstream))

    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from uniar import UniARForConditionalGeneration  # upstream
    from inference.visual_inputs import prepare_visual_inputs  # upstream
    from uniar_backend.api import UniAR
    from uniar_backend.tools import synthetic
    from uniar_backend.tools.bench import grid_for

    torch.set_num_threads(1)
    folder = os.path.join(tempfile.mkdtemp(prefix="uniar-prop-"), "ckpt")
    synthetic.write_checkpoint(folder, synthetic.proportionate_config(), seed=0,
                               source=os.path.join(FIXTURES, "uniar-tiny-bsq64"), bsq_encoder=False)
    up = UniARForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    _expand_mask(up)
    proc = AutoProcessor.from_pretrained(folder, padding_side="left")
    ours = UniAR.load(folder, device="cpu", dtype="float32", attention="sdpa")
    rows, cols = grid_for(a.steps)
    h, w = rows * 32, cols * 32
    prompt = "A red vintage car parked in front of a pastel blue house, golden hour."

    def upstream_t2i(seed):
        vi = prepare_visual_inputs([prompt], up, proc, h, w)
        torch.manual_seed(seed)
        with torch.no_grad():
            return up.generate_visual(prefix_input_ids=vi["prefix_input_ids"], attention_mask=vi["attention_mask"],
                                      pos_ids_image=vi["pos_ids_image"], pos_ids_all=vi["pos_ids_all"],
                                      image_token_num=vi["image_token_num"], temperature=1.0, cfg=1.5)

    def ours_t2i(seed):
        return ours.generate([prompt], h, w, cfg=1.5, seed=seed).indices

    image = Image.open(os.path.join(FIXTURES, "golden", "test_image.png")).convert("RGB")
    question = "Describe this image in detail."

    def upstream_caption():
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]}]
        inputs = proc.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt")
        inputs.pop("mm_token_type_ids", None)
        with torch.no_grad():
            out = up.generate(**inputs, max_new_tokens=a.new, do_sample=False)
        return proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)[0]

    def ours_caption():
        return ours.caption(question, image=image, max_new_tokens=a.new)[0]

    from uniar.modeling_vision_decoder import UniARVisualDecoder  # upstream
    from uniar_backend.decoder import load_decoder

    tiny = os.path.join(FIXTURES, "uniar-tiny")
    up_dec = UniARVisualDecoder.from_pretrained(tiny, device="cpu", torch_dtype=torch.float32)
    our_dec = load_decoder(tiny, device="cpu", dtype="float32", attention="sdpa")
    dec_tokens = UniAR.load(tiny, ("llm", "gen_head"), device="cpu", dtype="float32").generate(
        ["A red cube on a blue table."], 64, 64, cfg=1.5, seed=1)

    def upstream_decode():
        import numpy as np

        g = torch.Generator("cpu").manual_seed(0)
        ims = up_dec.decode(dec_tokens.indices, 64, 64, upsampling_ratio=2.0, num_inference_steps=a.decode_steps,
                            guidance_scale=1.5, generator=g)
        return torch.from_numpy(np.stack([np.asarray(im) for im in ims]).astype("int16"))

    def ours_decode():
        from uniar_backend.decoder import to_uint8

        im = our_dec.decode(dec_tokens, steps=a.decode_steps, guidance=1.5, upsampling_ratio=2.0, seed=0)
        return to_uint8(im).to(torch.int16)

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t0

    results = {}
    for name, pair in {"t2i": ((upstream_t2i, 5), (ours_t2i, 5)),
                       "caption": ((upstream_caption,), (ours_caption,)),
                       "decode": ((upstream_decode,), (ours_decode,))}.items():
        (fu, *au), (fo, *ao) = pair
        fu(*au), fo(*ao)  # warm-up
        tu, to, same = [], [], True
        for r in range(a.repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                out, t = timed(*(((fu, *au), (fo, *ao))[which]))
                (tu if which == 0 else to).append(t)
                if which == 0:
                    ref = out
                else:
                    mine = out
            if name == "decode":  # within 1 level of 255
                same &= bool((ref - mine).abs().max() <= 1)
            else:
                same &= bool(torch.equal(ref.cpu(), mine.cpu())) if name == "t2i" else ref == mine
        mu, mo = statistics.median(tu), statistics.median(to)
        results[name] = (mu, mo, same)
        print(f"{name}: upstream {mu:.2f} s, ours {mo:.2f} s, upstream / ours {mu / mo:.2f}x, identical output: {same}"
              + {"t2i": f" (N = {a.steps}, {h}x{w})", "caption": f" ({a.new} tokens max)",
                 "decode": f" ({a.decode_steps} steps, 128x128, uniar-tiny)"}[name], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
