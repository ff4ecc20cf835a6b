"""The ``ComfyExtension`` of the pack: the list of UniAR nodes (node ids are a stable API: never rename)."""

from __future__ import annotations

from .compat import ComfyExtension, io

from .caption import UniARCaption
from .decode import UniARDecode
from .generate import UniAREncodeImage, UniARGenerate
from .loader import UniARDownloadModel, UniARModelLoader
from .native import NODES as NATIVE_NODES
from .tokens import UniARLoadTokens, UniARPreviewTokens, UniARSaveTokens

NODES = [
    UniARModelLoader,
    UniARDownloadModel,
    UniAREncodeImage,
    UniARGenerate,
    UniARDecode,
    UniARCaption,
    UniARSaveTokens,
    UniARLoadTokens,
    UniARPreviewTokens,
    *NATIVE_NODES,
]


class UniARExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
