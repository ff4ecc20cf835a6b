"""A minimal stand-in for ComfyUI's ``comfy_api.latest`` and ``folder_paths``, used ONLY by tests/test_nodes.py to
import the node modules and read their schemas where ComfyUI is not installed.  It mirrors just the constructor
signatures the pack uses; the real thing is exercised by tests/test_comfyui_live.py."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "uniar_pack_under_test"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class StubInput:
    io_type = None

    def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, default=None,
                 advanced=None, control_after_generate=None, min=None, max=None, step=None, **kw):
        self.id = id
        self.options = list(options) if options is not None else None
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.default = default
        self.advanced = advanced
        self.control_after_generate = control_after_generate
        self.min, self.max, self.step = min, max, step
        self.extra = kw

    @property
    def is_widget(self) -> bool:
        return self.io_type in WIDGET_TYPES


class StubOutput:
    io_type = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False, **kw):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip


def _comfytype(name):
    return types.SimpleNamespace(
        io_type=name,
        Input=type(f"{name}Input", (StubInput,), {"io_type": name}),
        Output=type(f"{name}Output", (StubOutput,), {"io_type": name}),
    )


class Schema:
    def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, description="",
                 is_output_node=False, **kw):
        self.node_id = node_id
        self.display_name = display_name
        self.category = category
        self.inputs = inputs or []
        self.outputs = outputs or []
        self.description = description
        self.is_output_node = is_output_node


class NodeOutput:
    def __init__(self, *args, ui=None, **kw):
        self.args = args
        self.ui = ui


class ComfyNode:
    pass


class ComfyExtension:
    async def get_node_list(self):
        return []


def build_modules(tmp_root: str) -> dict:
    io = types.ModuleType("comfy_api.latest.io")
    for name, t in {"Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO",
                    "Image": "IMAGE", "Mask": "MASK", "Model": "MODEL", "Vae": "VAE", "Conditioning": "CONDITIONING",
                    "Latent": "LATENT", "Noise": "NOISE", "Sigmas": "SIGMAS"}.items():
        setattr(io, name, _comfytype(t))
    io.Custom = _comfytype
    io.Schema = Schema
    io.NodeOutput = NodeOutput
    io.ComfyNode = ComfyNode
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewText = lambda value, **kw: {"text": (value,)}
    ui.PreviewImage = lambda image, **kw: {"images": []}
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, ComfyExtension
    pinned = types.ModuleType("comfy_api.v0_0_2")  # the pinned version re-exports latest's io / ui / extension
    pinned.io, pinned.ui, pinned.ComfyExtension = io, ui, ComfyExtension
    comfy_api = types.ModuleType("comfy_api")
    comfy_api.latest, comfy_api.v0_0_2 = latest, pinned

    fp = types.ModuleType("folder_paths")
    fp.models_dir = os.path.join(tmp_root, "models")
    fp._paths = {}

    def add_model_folder_path(name, path, is_default=False):
        fp._paths.setdefault(name, [])
        if path not in fp._paths[name]:
            fp._paths[name].insert(0, path) if is_default else fp._paths[name].append(path)

    def get_folder_paths(name):
        return list(fp._paths[name])

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_input_directory = lambda: os.path.join(tmp_root, "input")
    fp.get_output_directory = lambda: os.path.join(tmp_root, "output")
    return {"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy_api.v0_0_2": pinned, "folder_paths": fp}


@contextlib.contextmanager
def stubbed_pack(tmp_root: str):
    """Import the pack (as package ``uniar_pack_under_test``) against the stubs; restore sys.modules after."""
    stubs = build_modules(tmp_root)
    saved = {k: sys.modules.get(k) for k in stubs}
    before = set(sys.modules)
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = pack
        spec.loader.exec_module(pack)
        ext = importlib.import_module(PACK + ".nodes.extension")
        yield types.SimpleNamespace(pack=pack, extension=ext, folder_paths=stubs["folder_paths"],
                                    sizes=importlib.import_module(PACK + ".nodes.sizes"))
    finally:
        for k in set(sys.modules) - before:
            if k == PACK or k.startswith(PACK + "."):
                del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
