"""Token utilities: save to the output folder, load from the input folder, preview the bits as an image."""

from __future__ import annotations

import os

import folder_paths

from . import bit_preview, token_files
from .compat import TOKENS_IN_TIP, UniARTokens, io


class UniARSaveTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARSaveTokens",
            display_name="UniAR Save Tokens",
            category="UniAR/tokens",
            description=("Saves visual tokens as a .safetensors file (the same format as the CLI's --out) in "
                         "ComfyUI's output folder. Copy it to the input folder to load it again."),
            inputs=[
                UniARTokens.Input("tokens", tooltip=TOKENS_IN_TIP),
                io.String.Input("filename_prefix", default="uniar/tokens",
                                tooltip=("File name prefix inside the output folder; may contain a sub-folder. "
                                         "A counter and .safetensors are appended.")),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, tokens, filename_prefix="uniar/tokens") -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        name = f"{filename}_{counter:05}_{token_files.TOKEN_EXT}"
        path = os.path.join(full_folder, name)
        tokens.save(path)
        info = {"filename": name, "subfolder": subfolder, "type": "output"}
        return io.NodeOutput(ui={"uniar_tokens": [info]})


class UniARLoadTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = token_files.list_token_files(folder_paths.get_input_directory())
        return io.Schema(
            node_id="UniARLoadTokens",
            display_name="UniAR Load Tokens",
            category="UniAR/tokens",
            description=("Loads a visual-token .safetensors file (from UniAR Save Tokens or the CLI) from "
                         "ComfyUI's input folder."),
            inputs=[
                io.Combo.Input("tokens_file", options=files, default=files[0] if files else None,
                               tooltip="A .safetensors token file in ComfyUI's input folder (or a sub-folder)."),
            ],
            outputs=[UniARTokens.Output(display_name="tokens", tooltip="The loaded visual tokens.")],
        )

    @classmethod
    def _path(cls, tokens_file):
        if not tokens_file:
            return None
        return token_files.safe_join(folder_paths.get_input_directory(), tokens_file)

    @classmethod
    def validate_inputs(cls, tokens_file=None):
        if tokens_file is None:
            return True
        p = cls._path(tokens_file)
        if p is None or not os.path.isfile(p):
            return f"token file '{tokens_file}' not found in the input folder"
        return True

    @classmethod
    def fingerprint_inputs(cls, tokens_file=None):
        p = cls._path(tokens_file)
        if p is None or not os.path.isfile(p):
            return ""
        st = os.stat(p)
        return f"{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, tokens_file) -> io.NodeOutput:
        from ..uniar_backend.errors import TokenError
        from ..uniar_backend.tokens import VisualTokens

        p = cls._path(tokens_file)
        if p is None:
            raise TokenError(f"token file '{tokens_file}' is outside the input folder")
        return io.NodeOutput(VisualTokens.load(p))


class UniARPreviewTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARPreviewTokens",
            display_name="UniAR Preview Tokens",
            category="UniAR/tokens",
            description=("Draws the bits the visual tokens hold, without any model: 'tiles' keeps the image "
                         "layout (each 16x16-pixel patch becomes a small square of its bits; levels side by side, "
                         "level 0 = final vision layer, 1.. = DeepStack), 'planes' shows one map per bit "
                         "position."),
            inputs=[
                UniARTokens.Input("tokens", tooltip=TOKENS_IN_TIP),
                io.Combo.Input("mode", options=list(bit_preview.PREVIEW_MODES), default="tiles",
                               tooltip=("tiles: per patch a square of its bits, in image layout. planes: one small "
                                        "map per bit position (shows which bits carry the picture).")),
                io.Int.Input("level", default=-1, min=-1, max=15,
                             tooltip="Which code level to show: -1 = all side by side, 0 = final layer, 1.. = DeepStack."),
                io.Int.Input("scale", default=2, min=1, max=16,
                             tooltip="Nearest-neighbour enlargement of the picture."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The bit picture, one per token row.")],
        )

    @classmethod
    def execute(cls, tokens, mode="tiles", level=-1, scale=2) -> io.NodeOutput:
        from ..uniar_backend.errors import InputError

        try:
            img = bit_preview.preview_bits(tokens.bits(), tokens.grid, mode=mode, level=int(level), scale=int(scale))
        except ValueError as e:
            raise InputError(str(e)) from None
        return io.NodeOutput(img)
