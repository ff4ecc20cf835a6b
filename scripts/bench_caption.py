"""Caption / VQA speed: milliseconds per answer token (greedy), on a checkpoint folder.

    .venv/bin/python scripts/bench_caption.py [--model ../shared/fixtures/uniar-tiny-bsq64] [--side 512]
                                              [--new 128] [--repeats 5]

Captions random visual tokens of a ``side`` x ``side`` image (``(side/32)^2`` image tokens in the prompt) with up to
``--new`` answer tokens; reports the median ms per generated token after the prefill (the first token carries the
prefill) and the median prefill time.  Run the same command on two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "uniar-tiny-bsq64"))
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)

    import torch

    from uniar_backend.api import UniAR
    from uniar_backend.tokens import VisualTokens

    torch.set_num_threads(1)
    ar = UniAR.load(a.model, ("llm", "lm_head"), device="cpu", dtype="float32")
    v = ar.model.cfg.vision
    n = (a.side // 32) ** 2
    g = torch.Generator().manual_seed(0)
    tok = VisualTokens(torch.randint(0, 2 ** min(v.bsq_dim, 62), (1, n, v.levels, v.merge_unit), generator=g),
                       a.side, a.side, v.bsq_dim, v.levels, v.merge_unit, ar.fingerprint)
    per_token, prefill, lengths = [], [], []
    for r in range(a.repeats + 1):
        marks = []
        t0 = time.perf_counter()
        ar.caption("Describe this image in detail.", tokens=tok, max_new_tokens=a.new,
                   callback=lambda i, total: marks.append(time.perf_counter()))
        if r == 0:
            continue  # warm-up
        prefill.append(marks[0] - t0)
        if len(marks) > 1:
            per_token.append((marks[-1] - marks[0]) / (len(marks) - 1) * 1000)
        lengths.append(len(marks))
    print(f"caption {a.side}x{a.side} ({n} image tokens), {statistics.median(lengths)} answer tokens: median "
          f"{statistics.median(per_token):.3f} ms/token after the first, prefill {statistics.median(prefill):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
