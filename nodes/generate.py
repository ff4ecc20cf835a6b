"""Image -> tokens (encode) and prompt (+ edit input) -> tokens (generate)."""

from __future__ import annotations

from ..uniar_backend.limits import MAX_SEED
from ..uniar_backend.sampling import IMAGE_SAMPLERS
from . import bit_preview, sizes
from .compat import UniARModel, UniARTokens, advanced, io
from .images import rgb_list

MODEL_IN_TIP = "The UniAR model from the UniAR Model Loader."
TOKENS_OUT_TIP = ("UniAR visual tokens: 32x32-pixel units of binary codes (final layer + DeepStack levels). "
                  "Decode them to an image, caption them, use them as an edit input, or save them.")


def _input_error(msg: str):
    from ..uniar_backend.errors import InputError

    return InputError(msg)


class UniAREncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniAREncodeImage",
            display_name="UniAR Encode Image",
            category="UniAR/tokens",
            description=("Turns images into UniAR visual tokens with the model's BSQ vision tokenizer (loads only "
                         "the vision tower). The image is resized the way the model's image processor does "
                         "(sides rounded to multiples of 32, pixel count within the processor's limits)."),
            inputs=[
                UniARModel.Input("model", tooltip=MODEL_IN_TIP),
                io.Image.Input("image", tooltip="Image(s) to tokenize; every image of the batch is encoded."),
            ],
            outputs=[UniARTokens.Output(display_name="tokens", tooltip=TOKENS_OUT_TIP)],
        )

    @classmethod
    def execute(cls, model, image) -> io.NodeOutput:
        from ..uniar_backend.tokens import VisualTokens
        from . import model_management as mgmt

        images = rgb_list(image)
        ar = mgmt.ar_model(model, ("vision",))
        cb = mgmt.progress_callback(len(images))
        out = []
        for i, im in enumerate(images):
            mgmt.check_interrupt()
            out.append(ar.encode(im))
            cb(i + 1, len(images))
        return io.NodeOutput(VisualTokens.cat(out) if len(out) > 1 else out[0])


class UniARGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARGenerate",
            display_name="UniAR Generate",
            category="UniAR/generate",
            description=("Generates image tokens from a text prompt, one 32x32-pixel token per step "
                         "(text-to-image), or edits an image given as IMAGE or as UNIAR_TOKENS (edit mode: the "
                         "prompt says what to change). Connect UniAR Decode to get pixels."),
            inputs=[
                UniARModel.Input("model", tooltip=MODEL_IN_TIP),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip=("What to draw, or for an edit what to change. An empty prompt gives an "
                                         "unconditional sample.")),
                io.Combo.Input("aspect_ratio", options=list(sizes.ASPECT_CHOICES), default=sizes.ASPECT_CUSTOM,
                               tooltip=("custom: use width x height as given. A ratio (e.g. 16:9): that shape "
                                        "with about width x height pixels, sides rounded to 32. match edit "
                                        "input: the size of the edit tokens, or the edit image's shape at about "
                                        "width x height pixels.")),
                io.Int.Input("width", default=512, min=sizes.MIN_SIDE, max=sizes.MAX_SIDE, step=32,
                             tooltip="Image width in pixels (multiple of 32; one token per 32x32 pixels)."),
                io.Int.Input("height", default=512, min=sizes.MIN_SIDE, max=sizes.MAX_SIDE, step=32,
                             tooltip="Image height in pixels (multiple of 32). Steps = (width/32) x (height/32)."),
                io.Float.Input("cfg", default=1.5, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip=("Classifier-free guidance: > 1 follows the prompt more closely (runs an "
                                        "extra empty-prompt row), 1 = no guidance (half the work).")),
                io.Float.Input("temperature", default=1.0, min=0.01, max=5.0, step=0.05, round=0.01,
                               tooltip="Sampling temperature of the token bits: lower = safer, higher = more varied."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Random seed. The same seed and inputs give the same tokens (as the CLI)."),
                io.Int.Input("batch_size", default=1, min=1, max=sizes.MAX_BATCH,
                             tooltip=("Images to generate for the prompt (one seed for the batch, as the CLI "
                                      "--batch-size). With several edit images: 1 = one output per edit image.")),
                io.Image.Input("edit_image", optional=True,
                               tooltip=("Optional image to edit (resized to the output size). Loads the vision "
                                        "tower too. Connect either this or edit_tokens.")),
                UniARTokens.Input("edit_tokens", optional=True,
                                  tooltip=("Optional visual tokens to edit (e.g. from a previous Generate): edits "
                                           "without re-encoding pixels.")),
                advanced(io.Combo.Input, "mode", options=list(IMAGE_SAMPLERS), default="fast",
                         tooltip=("Sampler: fast (KV caches, default) or the reference loop. Both give the same "
                                  "tokens; reference is slower and meant for checks.")),
            ],
            outputs=[UniARTokens.Output(display_name="tokens", tooltip=TOKENS_OUT_TIP)],
        )

    @classmethod
    def execute(cls, model, prompt, aspect_ratio, width, height, cfg, temperature, seed, batch_size,
                edit_image=None, edit_tokens=None, mode="fast") -> io.NodeOutput:
        from ..uniar_backend.api import check_generate_args
        from . import model_management as mgmt

        if edit_image is not None and edit_tokens is not None:
            raise _input_error("connect either edit_image or edit_tokens, not both")
        edit_images = rgb_list(edit_image) if edit_image is not None else None
        n_edit = len(edit_images) if edit_images is not None else (
            edit_tokens.batch_size if edit_tokens is not None else None)
        try:
            n = sizes.pair_batch(int(batch_size), n_edit)
        except ValueError as e:
            raise _input_error(str(e)) from None
        match = None
        if edit_tokens is not None:
            match = (edit_tokens.ar_width, edit_tokens.ar_height)
        elif edit_images is not None:
            match = (int(edit_images[0].shape[1]), int(edit_images[0].shape[0]))
        if aspect_ratio == sizes.ASPECT_MATCH and edit_tokens is not None:
            w, h = match
        else:
            try:
                w, h = sizes.resolve_size(aspect_ratio, int(width), int(height), match)
            except ValueError as e:
                raise _input_error(str(e)) from None
        # Checked here, before any weights load, rather than in validate_inputs: ComfyUI repeats a failed
        # validate_inputs once per input it takes, and its own per-input min / max checks already cover the ranges.
        edit_side = ((edit_tokens.ar_height, edit_tokens.ar_width) if edit_tokens is not None
                     else (h, w) if edit_images is not None else None)  # edit images are resized to the output
        check_generate_args([prompt] * n, h, w, float(cfg), float(temperature), int(seed), mode, edit_side)
        components = ("llm", "gen_head") + (("vision",) if edit_images is not None else ())
        ar = mgmt.ar_model(model, components)
        grid = (h // sizes.TOKEN_PIXELS, w // sizes.TOKEN_PIXELS)
        progress = mgmt.progress_callback(grid[0] * grid[1])
        tokens = ar.generate([prompt] * n, h, w, cfg=float(cfg), temperature=float(temperature),
                              seed=int(seed), edit_images=edit_images, edit_tokens=edit_tokens, mode=mode,
                              callback=progress, preview=_LivePreview(progress, grid))
        return io.NodeOutput(tokens)


class _LivePreview:
    """Shows the tokens drawn so far (first image of the batch) on the progress bar every few token rows."""

    def __init__(self, progress, grid):
        self.progress = progress
        self.grid = grid
        self.every = bit_preview.preview_every(grid)

    def __call__(self, bits) -> None:
        from PIL import Image

        img = bit_preview.drawn_preview(bits[0], self.grid)
        self.progress.show(Image.fromarray((img * 255).round().byte().numpy()))
