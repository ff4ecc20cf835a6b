"""ComfyUI node pack logic that needs no ComfyUI: checkpoint discovery, sizes, batch pairing, the bit-plane
preview, the node schemas (through a minimal stub of comfy_api, see comfy_stub.py) and the consistency of the
workflow files (UI templates and API copies) with those schemas."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_stub import ROOT, stubbed_pack  # noqa: E402

# the pure helpers, imported inside the pack loaded by path under a test name (the pack's real package name
# belongs to ComfyUI's loader); outside ComfyUI the pack's __init__ registers nothing
_spec = importlib.util.spec_from_file_location("uniar_pack_pure", os.path.join(ROOT, "__init__.py"),
                                               submodule_search_locations=[ROOT])
_pack = importlib.util.module_from_spec(_spec)
sys.modules["uniar_pack_pure"] = _pack
_spec.loader.exec_module(_pack)
checkpoints = importlib.import_module("uniar_pack_pure.nodes.checkpoints")
sizes = importlib.import_module("uniar_pack_pure.nodes.sizes")
token_files = importlib.import_module("uniar_pack_pure.nodes.token_files")
bit_preview = importlib.import_module("uniar_pack_pure.nodes.bit_preview")

FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(ROOT, "tests", "comfy_api")
UI_WORKFLOWS = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json")) if os.path.isdir(WORKFLOW_DIR) else []


def template_slug(name: str) -> str:
    """'UniAR - Text to image.json' (the title the Templates browser shows) -> 'uniar_text_to_image' (docs/)."""
    prefix, title = name[: -len(".json")].split(" - ", 1)
    return f"{prefix.lower()}_{title.lower().replace(' ', '_')}"
API_WORKFLOWS = sorted(f for f in os.listdir(API_DIR) if f.endswith(".json")) if os.path.isdir(API_DIR) else []
CORE_NODES = {"LoadImage", "SaveImage", "PreviewImage", "MarkdownNote", "Note", "KSampler", "VAEDecode"}
NODE_IDS = ["UniARModelLoader", "UniARDownloadModel", "UniAREncodeImage", "UniARGenerate", "UniARDecode",
            "UniARCaption", "UniARSaveTokens", "UniARLoadTokens", "UniARPreviewTokens", "UniARDecoderLoader",
            "UniARTokensToConditioning", "UniAREmptyLatent", "UniARReferenceNoise", "UniARReferenceSigmas"]


# ------------------------------------------------------------------------------------------------ checkpoints
def _ckpt(path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")


def test_list_and_find_checkpoints(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _ckpt(a / "UniAR-SFT")
    _ckpt(b / "ShareLab-SII" / "UniAR-RL")
    os.makedirs(a / "not-a-checkpoint")
    _ckpt(a / ".cache" / "hidden")
    os.symlink(os.path.join(FIXTURES, "uniar-tiny"), b / "tiny")
    folders = [str(a), str(b), str(tmp_path / "missing")]
    assert checkpoints.list_checkpoints(folders) == ["ShareLab-SII/UniAR-RL", "tiny", "UniAR-SFT"]
    assert checkpoints.find_checkpoint("UniAR-SFT", folders) == str(a / "UniAR-SFT")
    assert checkpoints.find_checkpoint("ShareLab-SII/UniAR-RL", folders) == str(b / "ShareLab-SII" / "UniAR-RL")
    assert checkpoints.find_checkpoint("tiny", folders).endswith("tiny")
    for bad in ("", "../a/UniAR-SFT", "/etc", "nope", "not-a-checkpoint", "D:UniAR-SFT", "C:\\x", "\\\\srv\\s",
                "a\\..\\..\\b", None, 3, ["UniAR-SFT"], "UniAR-SFT\0"):
        assert checkpoints.find_checkpoint(bad, folders) is None
    os.makedirs(a / "D:UniAR-SFT")  # a POSIX folder whose name Windows would read as drive D: not looked up
    _ckpt(a / "D:UniAR-SFT")
    assert checkpoints.find_checkpoint("D:UniAR-SFT", folders) is None


def test_checkpoint_completeness(tmp_path):
    assert checkpoints.checkpoint_looks_complete(os.path.join(FIXTURES, "uniar-tiny"))
    p = tmp_path / "UniAR-SFT"
    _ckpt(p)
    assert not checkpoints.checkpoint_looks_complete(str(p))
    for sub in ("bsq_encoder", "sd3_transformer", "sd3_pipeline"):
        os.makedirs(p / sub)
    (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    assert not checkpoints.checkpoint_looks_complete(str(p))  # shard missing: a partial download
    (p / "model-1.safetensors").write_bytes(b"0")
    assert checkpoints.checkpoint_looks_complete(str(p))
    # a damaged index is "not complete" (the download fetches it again), never an exception
    for bad in ("[1,2]", '{"weight_map": ["a"]}', '{"weight_map": {"x": 1}}', '{"weight_map": {"x": "../x"}}',
                '{"weight_map": {}}', "[" * 100_000, "{", '{"weight_map": {"x": "D:model-1.safetensors"}}'):
        (p / "model.safetensors.index.json").write_text(bad)
        assert not checkpoints.checkpoint_looks_complete(str(p)), bad
    assert checkpoints.hub_local_dir("ShareLab-SII/UniAR-RL", ["/m/uniar", "/x"]) == os.path.join("/m/uniar", "UniAR-RL")


# ------------------------------------------------------------------------------------------------ sizes
def test_check_side():
    """The size check the Generate node runs before loading anything (the library's own)."""
    from uniar_backend import limits
    from uniar_backend.errors import InputError

    limits.check_side("width", 512)
    for v in (0, 31, 100, 4097 + 31, True, 12.0):
        with pytest.raises(InputError):
            limits.check_side("width", v)
    with pytest.raises(InputError, match="e.g. 96"):
        limits.check_side("width", 100)


@pytest.mark.parametrize("aspect,w,h,expected", [
    (sizes.ASPECT_CUSTOM, 512, 384, (512, 384)),
    ("1:1", 512, 512, (512, 512)),
    ("16:9", 512, 512, (672, 384)),
    ("9:16", 512, 512, (384, 672)),
    ("4:3", 1024, 1024, (1184, 896)),
    ("21:9", 64, 64, (96, 32)),
])
def test_resolve_size_presets(aspect, w, h, expected):
    got = sizes.resolve_size(aspect, w, h)
    assert got == expected
    assert all(v % 32 == 0 and sizes.MIN_SIDE <= v <= sizes.MAX_SIDE for v in got)


def test_resolve_size_match_and_errors():
    assert sizes.resolve_size(sizes.ASPECT_MATCH, 512, 512, (1280, 720)) == (672, 384)
    assert sizes.resolve_size(sizes.ASPECT_MATCH, 512, 384, None) == (512, 384)  # no edit input: as custom
    with pytest.raises(ValueError):
        sizes.resolve_size("5:4", 512, 512)
    # extreme ratios stay within the allowed sides
    w, h = sizes.resolve_size(sizes.ASPECT_MATCH, 4096, 4096, (100000, 1))
    assert w == sizes.MAX_SIDE and h == sizes.MIN_SIDE


def test_pair_batch():
    assert sizes.pair_batch(1, None) == 1
    assert sizes.pair_batch(4, None) == 4
    assert sizes.pair_batch(3, 1) == 3  # one edit image shared by the batch
    assert sizes.pair_batch(1, 5) == 5  # one output per edit image
    assert sizes.pair_batch(5, 5) == 5
    with pytest.raises(ValueError, match="batch_size is 2"):
        sizes.pair_batch(2, 3)
    with pytest.raises(ValueError):
        sizes.pair_batch(0, None)


def test_check_sampling():
    from uniar_backend import limits
    from uniar_backend.errors import InputError

    limits.check_sampling(1.5, 1.0, 0)
    limits.check_sampling(1.5, 1.0, 2**64 - 1)
    for args in ((-1, 1.0, 0), (1.5, 0.0, 0), (1.5, 1.0, 2**64), (float("nan"), 1.0, 0)):
        with pytest.raises(InputError):
            limits.check_sampling(*args)


# ------------------------------------------------------------------------------------------------ token files
def test_list_token_files_and_safe_join(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "sub" / "B.SAFETENSORS").write_bytes(b"x")
    (tmp_path / "c.png").write_bytes(b"x")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    assert token_files.list_token_files(str(tmp_path)) == ["a.safetensors", "sub/B.SAFETENSORS"]
    assert token_files.list_token_files(str(tmp_path / "missing")) == []
    assert token_files.safe_join(str(tmp_path), "sub/B.SAFETENSORS") == str(tmp_path / "sub" / "B.SAFETENSORS")
    assert token_files.safe_join(str(tmp_path), "../x.safetensors") is None
    assert token_files.safe_join(str(tmp_path), "/etc/passwd") is None
    assert token_files.safe_join(str(tmp_path), "sub\\B.SAFETENSORS") == str(tmp_path / "sub" / "B.SAFETENSORS")
    # Windows forms (drive-relative, absolute, UNC, streams) and non-strings from a workflow: refused, no exception
    for bad in ("D:x.safetensors", "C:\\x.safetensors", "c:/x.safetensors", "\\\\srv\\share\\x.safetensors",
                "a.safetensors:stream", "sub\\..\\..\\x", "", None, 5, ["a.safetensors"], {"a": 1},
                "a\0.safetensors"):
        assert token_files.safe_join(str(tmp_path), bad) is None, bad


def test_token_file_listing_survives_link_loops(tmp_path):
    """Links back into input/ (two of them, which made the walk grow without end) are entered once; the walk is
    bounded whatever the folder holds."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.safetensors").write_bytes(b"x")
    os.symlink(str(tmp_path), tmp_path / "loop1", target_is_directory=True)
    os.symlink(str(tmp_path), tmp_path / "sub" / "loop2", target_is_directory=True)
    os.symlink(str(tmp_path / "sub"), tmp_path / "again", target_is_directory=True)
    assert token_files.list_token_files(str(tmp_path)) == ["sub/t.safetensors"]
    for i in range(30):  # many folders: the walk stops at its bound
        (tmp_path / "many" / f"d{i}").mkdir(parents=True)
    assert len(list(token_files.walk_folders(str(tmp_path), max_folders=10))) == 10


# ------------------------------------------------------------------------------------------------ preview
def _bits(B=2, rows=2, cols=3, L=4, U=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (B, rows * cols, L, U, d), generator=g)


def test_bit_grid_layout():
    bits = _bits(B=1, rows=2, cols=3)
    g = bit_preview.bit_grid(bits, (2, 3))
    assert g.shape == (1, 4, 4, 6, 16)
    # token t = r*cols + c, sub-patch u = i*2 + j  ->  patch (2r+i, 2c+j)
    for r in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    assert torch.equal(g[0, :, 2 * r + i, 2 * c + j], bits[0, r * 3 + c, :, i * 2 + j])
    with pytest.raises(ValueError):
        bit_preview.bit_grid(bits, (3, 3))


def test_preview_tiles_shows_the_bits():
    bits = _bits(B=2, rows=2, cols=3, d=16)
    img = bit_preview.preview_bits(bits, (2, 3), mode="tiles", level=0, scale=1)
    assert img.shape == (2, 4 * 4, 6 * 4, 3) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 1
    # level 0 is white: pixel (4*pr + a, 4*pc + b) of patch (pr, pc) = bit a*4 + b
    g = bit_preview.bit_grid(bits, (2, 3))
    for pr, pc, k in ((0, 0, 0), (3, 5, 15), (2, 1, 6)):
        a, b = divmod(k, 4)
        assert float(img[1, 4 * pr + a, 4 * pc + b, 0]) == float(g[1, 0, pr, pc, k])
    allv = bit_preview.preview_bits(bits, (2, 3), mode="tiles", level=-1, scale=2)
    assert allv.shape[0] == 2 and allv.shape[1] == 2 * 16 and allv.shape[2] == 2 * (4 * 24 + 3 * 4)


def test_preview_planes_and_64_bits():
    bits = _bits(B=1, rows=2, cols=2, d=64)
    img = bit_preview.preview_bits(bits, (2, 2), mode="planes", level=1, scale=3, gap=2)
    R = C = 4
    assert img.shape == (1, 3 * (8 * (R + 2) - 2), 3 * (8 * (C + 2) - 2), 3)
    g = bit_preview.bit_grid(bits, (2, 2))
    k = 13  # plane k sits at grid cell (k // 8, k % 8); level 1 is orange (R channel 1.0)
    pr, pc = divmod(k, 8)
    y0, x0 = pr * (R + 2), pc * (C + 2)
    plane = img[0, 3 * y0: 3 * (y0 + R): 3, 3 * x0: 3 * (x0 + C): 3, 0]
    assert torch.equal(plane, g[0, 1, :, :, k].float())
    with pytest.raises(ValueError):
        bit_preview.preview_bits(bits, (2, 2), mode="nope")
    with pytest.raises(ValueError):
        bit_preview.preview_bits(bits, (2, 2), level=4)


def test_preview_on_real_tokens():
    from uniar_backend.tokens import VisualTokens
    from safetensors.torch import load_file

    g = load_file(os.path.join(FIXTURES, "golden", "uniar-tiny-bsq64", "b1_t2i_64x64_cfg1.5.safetensors"))
    t = VisualTokens(g["indices"], 64, 64, 64, 4, 4)
    img = bit_preview.preview_bits(t.bits(), t.grid, mode="tiles")
    assert img.shape == (1, 4 * 8, 4 * (4 * 8) + 3 * 4, 3)


# ------------------------------------------------------------------------------------------------ import cost
def test_pack_import_is_cheap():
    """Importing the pack's __init__ (as ComfyUI does) pulls in no torch/transformers/diffusers and no nodes."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('uniar_pack_x', {os.path.join(ROOT, '__init__.py')!r}, "
        f"submodule_search_locations=[{ROOT!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['uniar_pack_x'] = m; spec.loader.exec_module(m)\n"
        "import inspect\n"
        "assert inspect.iscoroutinefunction(m.comfy_entrypoint)\n"
        "bad = [k for k in ('torch', 'transformers', 'diffusers', 'uniar_pack_x.nodes.extension', 'nodes') if k in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------------------ schemas
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("comfy"))
    os.makedirs(os.path.join(tmp, "input"))
    with stubbed_pack(tmp) as p:
        schemas = {cls.define_schema().node_id: (cls, cls.define_schema()) for cls in p.extension.NODES}
        p.schemas = schemas
        yield p


def test_model_folder_registered(pack):
    assert pack.folder_paths.get_folder_paths("uniar") == [os.path.join(pack.folder_paths.models_dir, "uniar")]


def test_node_list_and_ids(pack):
    assert list(pack.schemas) == NODE_IDS
    for nid, (cls, s) in pack.schemas.items():
        assert nid.startswith("UniAR") and s.category.startswith("UniAR/"), nid
        assert s.display_name and s.description, nid
        assert len({i.id for i in s.inputs}) == len(s.inputs)


def test_every_input_and_output_has_a_tooltip(pack):
    for nid, (cls, s) in pack.schemas.items():
        for i in s.inputs:
            assert i.tooltip and len(i.tooltip) > 10, f"{nid}.{i.id}"
        for o in s.outputs:
            assert o.tooltip, f"{nid} output {o.display_name}"


def test_expert_knobs_and_seeds(pack):
    s = {nid: {i.id: i for i in sch.inputs} for nid, (c, sch) in pack.schemas.items()}
    for nid, name in (("UniARModelLoader", "attention"), ("UniARDownloadModel", "attention"),
                      ("UniARGenerate", "mode"), ("UniARDecode", "decoder_prompt")):
        assert s[nid][name].advanced is True, (nid, name)
    for nid in ("UniARGenerate", "UniARDecode", "UniARCaption"):
        seed = s[nid]["seed"]
        assert seed.control_after_generate and seed.min == 0 and seed.max == 2**64 - 1
    g = s["UniARGenerate"]
    assert g["edit_image"].optional and g["edit_tokens"].optional and g["edit_tokens"].io_type == "UNIAR_TOKENS"
    assert g["width"].step == 32 and g["width"].min == 32
    c = s["UniARCaption"]
    assert c["image"].optional and c["tokens"].optional
    assert pack.schemas["UniARCaption"][1].is_output_node and pack.schemas["UniARSaveTokens"][1].is_output_node


def test_validate_inputs_take_one_input_each(pack):
    """ComfyUI reports a failed validate_inputs once per input the function takes: a check over several inputs
    turns one bad value into several identical errors.  Every validate_inputs of the pack takes one input (the
    Generate node checks its size and sampling values in execute, before loading anything)."""
    import inspect

    found = 0
    for node_id, (cls, _schema) in pack.schemas.items():
        fn = getattr(cls, "validate_inputs", None)
        if fn is None or not node_id.startswith("UniAR"):
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        assert len(params) <= 1, f"{node_id}.validate_inputs takes {[p.name for p in params]}"
        found += 1
    assert found >= 2


def test_join_answers(pack):
    from comfy_stub import PACK

    join_answers = importlib.import_module(PACK + ".nodes.caption").join_answers
    assert join_answers(["one"]) == "one"
    assert join_answers(["a", "b"]) == "[0] a\n\n[1] b"


def test_nodes_use_no_private_names_of_other_node_modules():
    """Node modules import each other's public names only, and the backend through its public modules."""
    import ast

    for fn in sorted(os.listdir(os.path.join(ROOT, "nodes"))):
        if not fn.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "nodes", fn)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"nodes/{fn} imports private {private} from {node.module}"


def _widget_inputs(schema):
    """Widget values in the order the frontend stores them (required inputs first, then optional; a seed with
    control_after_generate takes one extra value)."""
    req = [i for i in schema.inputs if not i.optional]
    opt = [i for i in schema.inputs if i.optional]
    out = []
    for i in req + opt:
        if i.is_widget:
            out.append(i)
            if i.control_after_generate:
                out.append(None)
    return out


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_matches_nodes(pack, name):
    with open(os.path.join(WORKFLOW_DIR, name)) as f:
        wf = json.load(f)
    assert "nodes" in wf and "links" in wf
    ids = {n["id"] for n in wf["nodes"]}
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, typ = link
        assert src in ids and dst in ids, link
    have_loader = False
    for n in wf["nodes"]:
        t = n["type"]
        assert t in pack.schemas or t in CORE_NODES, f"{name}: unknown node type {t}"
        if t not in pack.schemas:
            continue
        schema = pack.schemas[t][1]
        widgets = _widget_inputs(schema)
        values = n.get("widgets_values", [])
        assert len(values) == len(widgets), f"{name}: {t} has {len(values)} widget values, expected {len(widgets)}"
        for w, v in zip(widgets, values):
            if w is None:
                assert v in ("fixed", "increment", "decrement", "randomize"), v
            elif w.io_type == "COMBO" and w.id != "ckpt_name":
                assert v in w.options, f"{name}: {t}.{w.id}={v!r}"
            elif w.io_type == "INT":
                assert isinstance(v, int) and (w.min is None or v >= w.min) and (w.max is None or v <= w.max)
            elif w.io_type == "FLOAT":
                assert isinstance(v, (int, float)) and (w.min is None or v >= w.min) and (w.max is None or v <= w.max)
        socket_names = {i["name"]: i for i in n.get("inputs", [])}
        for i in schema.inputs:
            if not i.is_widget and not i.optional:
                assert socket_names.get(i.id, {}).get("link") is not None, f"{name}: {t}.{i.id} is not connected"
        if t == "UniARModelLoader":
            have_loader = True
            assert values[0] == "UniAR-SFT"
            # the frontend's missing-model check wants single files and would report the installed folder as
            # missing: templates carry no properties.models (the pack's own extension reports a missing folder)
            assert "models" not in n.get("properties", {}), f"{name}: the loader carries properties.models"
        if t == "UniARGenerate":
            w = dict(zip([x.id if x else "ctl" for x in widgets], values))
            assert w["width"] >= 256 and w["height"] >= 256  # templates use real sizes, not fixture sizes
    assert have_loader


def test_every_template_has_a_thumbnail_and_screenshot():
    for name in UI_WORKFLOWS:
        base = name[:-5]
        assert name.startswith("UniAR - "), f"{name}: the file name is the title in the Templates browser"
        assert os.path.isfile(os.path.join(WORKFLOW_DIR, base + ".jpg")), f"{base}.jpg thumbnail missing"
        shot = os.path.join(ROOT, "docs", template_slug(name) + ".png")
        assert os.path.isfile(shot), f"{shot} screenshot missing"
    assert len(UI_WORKFLOWS) >= 5
    assert not os.path.isdir(os.path.join(ROOT, "workflows")), "templates live in example_workflows/ only"


@pytest.mark.parametrize("name", API_WORKFLOWS)
def test_api_workflow_matches_nodes(pack, name):
    with open(os.path.join(API_DIR, name)) as f:
        wf = json.load(f)
    assert "nodes" not in wf
    for nid, node in wf.items():
        t = node["class_type"]
        assert t in pack.schemas or t in CORE_NODES, t
        for k, v in node["inputs"].items():
            if isinstance(v, list):
                assert v[0] in wf, f"{name}: {nid}.{k} links to missing node {v[0]}"
        if t not in pack.schemas:
            continue
        schema = pack.schemas[t][1]
        by_id = {i.id: i for i in schema.inputs}
        unknown = set(node["inputs"]) - set(by_id)
        assert not unknown, f"{name}: {t} has unknown inputs {unknown}"
        for i in schema.inputs:
            if not i.optional:
                assert i.id in node["inputs"], f"{name}: {t} lacks required input {i.id}"
            v = node["inputs"].get(i.id)
            if i.io_type == "COMBO" and isinstance(v, str) and i.id != "ckpt_name":
                assert v in i.options, f"{name}: {t}.{i.id}={v!r}"
        if t == "UniARModelLoader":
            assert node["inputs"]["ckpt_name"] in ("uniar-tiny", "uniar-tiny-bsq64")
        if t == "UniARGenerate":
            assert node["inputs"]["width"] * node["inputs"]["height"] <= 128 * 128  # fixture-sized: seconds on CPU


def test_api_and_ui_workflows_cover_the_same_use_cases():
    ui = {template_slug(n) for n in UI_WORKFLOWS}
    api = {n[:-5] for n in API_WORKFLOWS}
    pairs = {"text_to_image": "uniar_text_to_image", "edit_image": "uniar_edit_an_image",
             "caption": "uniar_caption_and_vqa", "reconstruct": "uniar_reconstruct_an_image",
             "shared_context": "uniar_shared_context"}
    assert set(pairs) <= api and set(pairs.values()) <= ui


def test_drawn_preview_and_its_rate():
    import torch

    grid = (3, 4)
    bits = torch.ones(5, 2, 4, 16, dtype=torch.int64)  # 5 of 12 tokens drawn, all bits 1
    img = bit_preview.drawn_preview(bits, grid, min_width=64)
    assert img.dim() == 3 and img.shape[-1] == 3 and img.shape[1] >= 64
    full = bit_preview.preview_bits(torch.ones(1, 12, 2, 4, 16), grid, mode="tiles", level=0)[0]
    scale = img.shape[1] // full.shape[1]
    h_row = img.shape[0] // 3
    assert float(img[: h_row].min()) == 1.0  # the first token row is drawn (white bits)
    assert float(img[-1, -1, 0]) == 0.5  # the last token is not drawn yet: grey
    assert scale >= 1 and img.shape[1] == full.shape[1] * scale
    assert bit_preview.preview_every((16, 16)) == 32  # two token rows at 512x512: 8 pictures
    assert bit_preview.preview_every((2, 2)) == 2


def test_nodes_use_the_pinned_comfy_api_version():
    """Every node module takes io / ui / ComfyExtension from nodes/compat.py, which imports the pinned
    comfy_api.v0_0_2 (comfy_api.latest only as its fallback)."""
    import glob
    import re

    for path in glob.glob(os.path.join(ROOT, "nodes", "*.py")):
        src = open(path, encoding="utf-8").read()
        imports = re.findall(r"^\s*(?:from|import) comfy_api[.\w]*", src, re.M)
        if path.endswith("compat.py"):
            assert [i.split()[-1] for i in imports] == ["comfy_api.v0_0_2", "comfy_api.latest"]
        else:
            assert imports == [], (path, imports)
