"""Tokens -> pixels with the SD3.5-Medium-based UniAR image decoder."""

from __future__ import annotations

from ..uniar_backend.limits import MAX_SEED
from .compat import TOKENS_IN_TIP, UniARModel, UniARTokens, advanced, io, upsampling_ratio_input


class UniARDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARDecode",
            display_name="UniAR Decode",
            category="UniAR/decode",
            description=("Turns UniAR visual tokens into an image with the checkpoint's diffusion decoder "
                         "(SD3.5-Medium DiT + VAE, conditioned on the tokens). Loads only the decoder, never the "
                         "language model."),
            inputs=[
                UniARModel.Input("model", tooltip="The UniAR model (its image decoder is used)."),
                UniARTokens.Input("tokens", tooltip=TOKENS_IN_TIP),
                io.Int.Input("steps", default=28, min=1, max=200,
                             tooltip="Denoising steps of the decoder (28 is the reference setting)."),
                io.Float.Input("guidance", default=1.5, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Decoder guidance scale on the token condition (1.5 is the reference)."),
                upsampling_ratio_input(),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the decoder's starting noise. Same seed and tokens, same image."),
                advanced(io.String.Input, "decoder_prompt", multiline=True, default="", optional=True,
                         tooltip=("Optional text for the decoder's text encoders; empty (the default, as in "
                                  "UniAR) lets the tokens alone drive the picture.")),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The decoded image(s), one per token row.")],
        )

    @classmethod
    def execute(cls, model, tokens, steps, guidance, upsampling_ratio, seed, decoder_prompt="") -> io.NodeOutput:
        from . import model_management as mgmt

        ckpt, dec = mgmt.decoder_model(model)
        images = dec.decode(tokens, steps=int(steps), guidance=float(guidance),
                            upsampling_ratio=float(upsampling_ratio), seed=int(seed),
                            decoder_prompt=decoder_prompt or None,
                            callback=mgmt.progress_callback(int(steps) * max(1, tokens.batch_size)))
        return io.NodeOutput(images.float().cpu().clamp(0, 1).contiguous())
