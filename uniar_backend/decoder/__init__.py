"""UniAR image decoder: visual tokens -> images with the checkpoint's SD3.5-Medium DiT and VAE.

Public API::

    from uniar_backend.decoder import load_decoder, save_images
    dec = load_decoder("UniAR-SFT", device="auto", dtype="auto", attention="auto", cache_dir=None)
    images = dec.decode(tokens, steps=28, guidance=1.5, upsampling_ratio=1.0, seed=0)   # [B, H, W, 3] in [0, 1]
    save_images(images, "out.png")

Only the parts the decoder needs are loaded: the ``bsq_output_proj*`` MLPs of ``bsq_encoder/``, the DiT, the
VAE and the schedule.  The constant decoder prompt is encoded once and cached (:mod:`.prompt`), so the text
encoders are not loaded again.  Importing this package does not import diffusers or transformers.
"""

from .images import output_paths, save_images, to_uint8
from .pipeline import UniARDecoder, check_decode_args, load_decoder, target_size
from .prompt import (
    DEFAULT_DECODER_PROMPT,
    PromptEmbeddings,
    default_cache_dir,
    encode_prompt,
    prompt_embeddings,
)

__all__ = [
    "DEFAULT_DECODER_PROMPT",
    "PromptEmbeddings",
    "UniARDecoder",
    "check_decode_args",
    "default_cache_dir",
    "encode_prompt",
    "load_decoder",
    "output_paths",
    "prompt_embeddings",
    "save_images",
    "target_size",
    "to_uint8",
]
