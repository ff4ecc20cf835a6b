"""ComfyUI entry point of the UniAR node pack.

Importing this file is cheap and has one side effect: it registers the ``uniar`` model folder
(``models/uniar``; more folders through ``extra_model_paths.yaml``).  The nodes (and through them torch,
transformers, diffusers) are imported when ComfyUI calls ``comfy_entrypoint``; the node modules import their
heavy dependencies only when a node runs.  Everything is imported relatively: ComfyUI owns the top-level
module name ``nodes``.
"""

import os

try:  # inside ComfyUI
    import folder_paths as _folder_paths
except ImportError:  # imported outside ComfyUI (tests, tools): nothing to register
    _folder_paths = None

if _folder_paths is not None:
    _folder_paths.add_model_folder_path("uniar", os.path.join(_folder_paths.models_dir, "uniar"))

# The frontend extension: the Caption / VQA node shows its answer on itself (web/uniar.js).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import UniARExtension

    return UniARExtension()
