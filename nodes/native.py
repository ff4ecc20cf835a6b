"""The native decode route: UniAR tokens through ComfyUI's own samplers and VAE nodes.

``UniAR Decoder Loader`` gives the checkpoint's DiT as a ``MODEL`` and its VAE as a ``VAE``; ``UniAR Tokens to
Conditioning`` turns tokens into ``positive`` / ``negative``; ``UniAR Empty Latent`` sizes the ``LATENT``.  Then
KSampler (``euler`` / ``simple``) + VAE Decode, or any node that takes these types.  ``UniAR Reference Noise``
and ``UniAR Reference Sigmas`` reproduce ``UniAR Decode`` exactly through ``SamplerCustomAdvanced`` (with a
``CFGGuider`` at the same guidance)."""

from __future__ import annotations

from ..uniar_backend.limits import MAX_SEED
from .compat import TOKENS_IN_TIP, UniARModel, UniARTokens, advanced, io, upsampling_ratio_input

class UniARDecoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARDecoderLoader",
            display_name="UniAR Decoder Loader",
            category="UniAR/decode",
            description=("Loads the checkpoint's image decoder as ComfyUI models: the DiT as a MODEL (flow "
                         "matching with the checkpoint's shift, so KSampler with euler / simple works) and the VAE "
                         "as a VAE (VAE Decode / Encode, tiled too). Use UniAR Tokens to Conditioning for positive / "
                         "negative and UniAR Empty Latent for the latent."),
            inputs=[UniARModel.Input("model", tooltip=("The UniAR model (its dtype and weights settings apply; "
                                                       "int8 / fp8 / int4 quantise the DiT blocks)."))],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The UniAR DiT as a ComfyUI diffusion model."),
                io.Vae.Output(display_name="VAE", tooltip="The checkpoint's SD3 VAE (decode and encode)."),
            ],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        from . import model_management as mgmt

        patcher, vae = mgmt.native_decoder(model)
        return io.NodeOutput(patcher, vae)


class UniARTokensToConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARTokensToConditioning",
            display_name="UniAR Tokens to Conditioning",
            category="UniAR/decode",
            description=("Turns UniAR visual tokens into the conditioning of the UniAR DiT: positive carries the "
                         "tokens' features, negative the all-zero features (UniAR's unconditional half), both with "
                         "the checkpoint's cached decoder prompt, or with the SD3 text conditioning you connect."),
            inputs=[
                UniARModel.Input("model", tooltip="The UniAR model the tokens belong to (its token encoder is used)."),
                UniARTokens.Input("tokens", tooltip=TOKENS_IN_TIP),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip=("Optional SD3 text conditioning (e.g. CLIPTextEncodeSD3 with SD3.5's "
                                               "text encoders) for both halves; empty: the checkpoint's decoder "
                                               "prompt, as UniAR Decode.")),
                advanced(io.String.Input, "decoder_prompt", multiline=True, default="", optional=True,
                         tooltip=("Decoder prompt when no conditioning is connected; empty (the default, as in "
                                  "UniAR) lets the tokens alone drive the picture.")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Token features + decoder prompt."),
                io.Conditioning.Output(display_name="negative", tooltip="Zero features + the same prompt."),
            ],
        )

    @classmethod
    def execute(cls, model, tokens, conditioning=None, decoder_prompt="") -> io.NodeOutput:
        import torch

        from . import model_management as mgmt
        from ..uniar_backend.decoder.conditioning import token_grid
        from .native_model import FINGERPRINT_KEY, GRID_KEY, SIGLIP_KEY

        cond = mgmt.conditioner(model)
        feats = cond.features(tokens, device=mgmt.load_device()).cpu()
        if conditioning is None:
            emb = cond.prompt(decoder_prompt or None)
            conditioning = [[emb.prompt_embeds.cpu(), {"pooled_output": emb.pooled.cpu()}]]
        extra = {GRID_KEY: token_grid(tokens), FINGERPRINT_KEY: cond.fingerprint}

        def attach(values: torch.Tensor) -> list:
            return [[t, {**d, SIGLIP_KEY: values, **extra}] for t, d in conditioning]

        return io.NodeOutput(attach(feats), attach(torch.zeros_like(feats)))


class UniAREmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniAREmptyLatent",
            display_name="UniAR Empty Latent",
            category="UniAR/decode",
            description=("An empty SD3 latent of the size the tokens decode to at this upsampling ratio (one per "
                         "token image; non-square included)."),
            inputs=[
                UniARTokens.Input("tokens", tooltip="The tokens to decode (their image size sets the latent size)."),
                upsampling_ratio_input(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="Zeros, [batch, 16, height/8, width/8].")],
        )

    @classmethod
    def execute(cls, tokens, upsampling_ratio) -> io.NodeOutput:
        import torch

        from ..uniar_backend.decoder.conditioning import target_size

        h, w = target_size(tokens.ar_height, tokens.ar_width, float(upsampling_ratio))
        return io.NodeOutput({"samples": torch.zeros(tokens.batch_size, 16, h // 8, w // 8)})


class _ReferenceNoise:
    """A ComfyUI ``NOISE``: UniAR Decode's starting latents for a seed (a CPU generator, in the DiT's dtype)."""

    def __init__(self, seed: int, dtype):
        self.seed, self.dtype = int(seed), dtype

    def generate_noise(self, input_latent):
        from ..uniar_backend.decoder.conditioning import reference_noise

        samples = input_latent["samples"]
        return reference_noise(samples.shape, self.seed, self.dtype).to(samples.dtype)


def _uniar_model(model, node: str):
    from ..uniar_backend.errors import InputError
    from .native_model import UniARDiTModel

    inner = getattr(model, "model", None)
    if not isinstance(inner, UniARDiTModel):
        raise InputError(f"{node} needs the MODEL of 'UniAR Decoder Loader', got {type(inner or model).__name__}")
    return inner


class UniARReferenceNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARReferenceNoise",
            display_name="UniAR Reference Noise",
            category="UniAR/decode",
            description=("The starting noise UniAR Decode draws for a seed (for SamplerCustomAdvanced): with UniAR "
                         "Reference Sigmas and a CFGGuider it reproduces UniAR Decode."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of UniAR Decoder Loader (its dtype is the noise dtype)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="The seed UniAR Decode would be given."),
            ],
            outputs=[io.Noise.Output(display_name="NOISE", tooltip="Noise for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, seed) -> io.NodeOutput:
        return io.NodeOutput(_ReferenceNoise(seed, _uniar_model(model, "UniAR Reference Noise").get_dtype()))


class UniARReferenceSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARReferenceSigmas",
            display_name="UniAR Reference Sigmas",
            category="UniAR/decode",
            description=("The sigmas of the checkpoint's FlowMatchEuler schedule that UniAR Decode steps through "
                         "(KSampler's 'simple' scheduler is close to it, not equal)."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of UniAR Decoder Loader (its scheduler config is used)."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps (28: the reference)."),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS", tooltip="steps + 1 sigmas, 1 down to 0.")],
        )

    @classmethod
    def execute(cls, model, steps) -> io.NodeOutput:
        from ..uniar_backend.decoder.conditioning import reference_sigmas

        inner = _uniar_model(model, "UniAR Reference Sigmas")
        return io.NodeOutput(reference_sigmas(inner.uniar_scheduler_config, int(steps)))


NODES = [UniARDecoderLoader, UniARTokensToConditioning, UniAREmptyLatent, UniARReferenceNoise, UniARReferenceSigmas]
