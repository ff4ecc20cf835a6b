"""What the Generate node's live preview costs: the fast sampler with and without it, same run, same model.

    .venv/bin/python scripts/bench_preview.py [--steps 256] [--repeats 3]

The model is the benchmark's proportionate random UniAR (``uniar_backend.bench``); the preview is the node's own
(``nodes/common.py``: bits drawn so far -> level-0 tiles -> PIL image, JPEG-encoded as ComfyUI's server does before
sending it), every ``preview_every`` steps.  Prints the median seconds per image of both and their ratio (with /
without; 1.00 = free), and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pack():
    """The pack as a package (its node helpers import the backend relatively), without ComfyUI."""
    spec = importlib.util.spec_from_file_location("uniar_pack_bench", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return spec.name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    name = _pack()
    import torch
    from PIL import Image

    common = importlib.import_module(name + ".nodes.common")
    bench = importlib.import_module(name + ".uniar_backend.tools.bench")
    synthetic = importlib.import_module(name + ".uniar_backend.tools.synthetic")
    sampling = importlib.import_module(name + ".uniar_backend.sampling")

    torch.set_num_threads(1)
    model = synthetic.random_model(synthetic.proportionate_config(), ("llm", "vision", "gen_head"), "cpu",
                                   torch.float32, seed=0)
    grid = bench.grid_for(a.steps)
    prefix = bench.make_prefix(model, *grid, seed=0)
    shown = []

    def preview(drawn):
        img = common.drawn_preview(drawn[0], grid)
        buf = io.BytesIO()
        Image.fromarray((img * 255).round().byte().numpy()).save(buf, format="JPEG", quality=95)
        shown.append(buf.tell())

    preview.every = common.preview_every(grid)

    def run(with_preview):
        t0 = time.perf_counter()
        bits = sampling.sample(model, prefix, 1.5, 1.0, 0, "fast", preview=preview if with_preview else None)
        return bits, time.perf_counter() - t0

    run(False), run(True)  # warm-up
    times = {False: [], True: []}
    same = True
    ref = None
    for r in range(a.repeats):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            bits, t = run(flag)
            times[flag].append(t)
            ref = bits if ref is None else ref
            same &= bool(torch.equal(bits, ref))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    per_image = len(shown) // (a.repeats + 1)
    print(f"N={a.steps} ({grid[0]}x{grid[1]} tokens), preview every {preview.every} steps ({per_image} per image): "
          f"median s/image without {off:.3f}, with {on:.3f}; ratio with/without {on / off:.3f}; "
          f"tokens identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
