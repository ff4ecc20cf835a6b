"""Loading: sharded checkpoints, per-component loading, dtype/attention options, cheap imports."""

import json
import subprocess
import sys

import torch
from conftest import ROOT, TEST_IMAGE, ckpt_path, load_model
from test_bad_inputs import copy_ckpt

from uniar_backend import api
from uniar_backend.loader import Checkpoint
from uniar_backend.preprocess import load_image


def test_sharded_checkpoint_loads_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_ckpt(tmp_path, skip=("model.safetensors",))
    sd = load_file(ckpt_path("uniar-tiny-bsq64") + "/model.safetensors")
    keys = sorted(sd)
    n = 3
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    wm = {}
    for i in range(n):
        part = keys[i::n]
        save_file({k: sd[k].to(torch.bfloat16) if sd[k].is_floating_point() else sd[k] for k in part},
                  str(folder / names[i]), metadata={"format": "pt"})
        wm.update({k: names[i] for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    ck = Checkpoint(folder)
    m = ck.load_ar(device="cpu", dtype="bfloat16")
    ck0, m0 = load_model("uniar-tiny-bsq64", dtype="bfloat16")
    a = api.UniAR(ck, m).generate(["a red cube"], 64, 64, seed=1)
    b = api.UniAR(ck0, m0).generate(["a red cube"], 64, 64, seed=1)
    assert torch.equal(a.indices, b.indices)
    assert m.fingerprint == m0.fingerprint  # fingerprint independent of storage dtype/sharding


def test_components_load_only_what_is_needed():
    _, vision = load_model("uniar-tiny-bsq64", components=("vision",))
    assert vision.language_model is None and vision.lm_head is None and vision.visual_decoder is None
    _, cap = load_model("uniar-tiny-bsq64", components=("llm", "lm_head"))
    assert cap.visual_decoder is None and not cap.visual.has_encoder
    keys = set(cap.state_dict())
    assert "model.visual.merger.linear_fc1.weight" in keys and "model.visual.patch_embed.proj.weight" not in keys


def test_attention_backends_agree():
    ck, sdpa = load_model("uniar-tiny-bsq64", attention="sdpa")
    _, eager = load_model("uniar-tiny-bsq64", attention="eager")
    la, lb = [], []
    ta = api.UniAR(ck, sdpa).generate(["a dog"], 64, 96, seed=11, logits_out=la)
    tb = api.UniAR(ck, eager).generate(["a dog"], 64, 96, seed=11, logits_out=lb)
    assert (la[0] - lb[0]).abs().max() < 1e-5
    assert torch.equal(ta.indices, tb.indices)


def test_generation_does_not_touch_global_rng():
    ck, m = load_model("uniar-tiny")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    api.UniAR(ck, m).generate(["x"], 32, 32, seed=5)
    assert torch.equal(before, torch.get_rng_state())


def test_private_generator_equals_global_seeding():
    """The reference seeds the global generator; our private generator yields the same stream."""
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    assert torch.equal(torch.empty(100).exponential_(1, generator=g), torch.empty(100).exponential_(1))


def test_import_is_cheap():
    code = ("import sys, uniar_backend, uniar_backend.tokens, uniar_backend.errors;"
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_callback_progress_and_cancel():
    ck, m = load_model("uniar-tiny")
    seen = []
    api.UniAR(ck, m).generate(["x"], 64, 64, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    class Cancelled(Exception):
        pass

    def cancel(i, n):
        if i == 2:
            raise Cancelled

    import pytest

    with pytest.raises(Cancelled):
        api.UniAR(ck, m).generate(["x"], 64, 64, callback=cancel)
    # the model is still usable after a cancel
    assert api.UniAR(ck, m).generate(["x"], 64, 64, seed=0).indices.shape == (1, 4, 4, 4)
    txt = []
    api.UniAR(ck, m).caption("q", image=load_image(TEST_IMAGE), max_new_tokens=3, callback=lambda i, n: txt.append(i))
    assert txt == [1, 2, 3]


def test_add_components_reuses_loaded_tensors(monkeypatch):
    from uniar_backend import checkpoint as ckmod

    ck = Checkpoint(ckpt_path("uniar-tiny-bsq64"))
    gen = ck.load_ar(components=("llm", "gen_head"), device="cpu", dtype="float32")
    kept = gen.language_model.layers[0].mlp.up_proj.weight
    read = []
    orig = ckmod.WeightFiles.read

    def spy(self, keys):
        keys = list(keys)
        read.extend(keys)
        return orig(self, keys)

    monkeypatch.setattr(ckmod.WeightFiles, "read", spy)
    both = ck.load_ar(components=("lm_head", "vision"), device="cpu", reuse=gen)
    assert set(both.components) == {"llm", "gen_head", "lm_head", "vision"}
    assert both.language_model.layers[0].mlp.up_proj.weight.data_ptr() == kept.data_ptr()
    assert read and all(k.startswith(("lm_head", "model.visual.")) for k in read)
    assert not any(k.startswith("model.visual.bsq_output_proj") for k in read)  # codebook side was loaded
    assert api.UniAR(ck, both).caption("What is in this image?", image=load_image(TEST_IMAGE), max_new_tokens=16) == \
        [" wasscri wind systemDeDeDeDeDeDeDeDeDeDeDeDe"]


def test_compute_device_override():
    ck, m = load_model("uniar-tiny")
    assert m.device == torch.device("cpu")
    m.device = "cpu"
    assert m.device == torch.device("cpu")
    m.device = None
    # compute_device decides the attention backend (checked against the device the model will run on)
    m2 = ck.load_ar(components=("vision",), device="cpu", compute_device="cpu", attention="auto")
    assert m2.attention == "sdpa"


def test_chat_template_json_layout(tmp_path):
    """Some Qwen-VL releases ship the template as chat_template.json: same prompt, same answer."""
    from test_bad_inputs import copy_ckpt

    folder = copy_ckpt(tmp_path, skip=("chat_template.jinja",))
    tpl = open(ckpt_path("uniar-tiny-bsq64") + "/chat_template.jinja", encoding="utf-8").read()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": tpl}))
    ck = Checkpoint(folder)
    m = ck.load_ar(components=("llm", "lm_head", "vision"), device="cpu", dtype="float32")
    assert api.UniAR(ck, m).caption("What is in this image?", image=load_image(TEST_IMAGE), max_new_tokens=16) == \
        [" wasscri wind systemDeDeDeDeDeDeDeDeDeDeDeDe"]


def test_backend_import_graph_has_no_cycle_and_no_comfyui():
    """The library's layering (README, Architecture): ``uniar_backend`` never imports ComfyUI or the pack's nodes
    (except the benchmark tool, whose ``--ops comfy`` measures ComfyUI's layers on request), and its modules import
    each other without a cycle (imports inside functions included)."""
    import ast
    import os

    base = os.path.join(ROOT, "uniar_backend")
    paths = {}
    for d, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                paths[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    graph = {m: set() for m in paths}
    for m, p in paths.items():
        package = m if p.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(p).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    parts = package.split(".")
                    mod = ".".join(parts[: len(parts) - node.level + 1] + ([mod] if mod else []))
                names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in paths else mod for a in node.names]
            for n in names:
                assert m.startswith("uniar_backend.tools.") or n.split(".")[0] not in ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes"), \
                    f"{m} imports {n}"
                if n in paths and n != m and not m.startswith(n + "."):  # a submodule may import its package
                    graph[m].add(n)
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 30 and graph["uniar_backend.sampling.text"] >= {"uniar_backend.runtime"}
