"""UniAR inference library (ComfyUI-free): tokenize images, generate / edit image tokens, caption, decode.

Importing this package is cheap: torch, transformers and diffusers are imported by the submodules that need
them.  Entry points::

    from uniar_backend.api import UniAR      # UniAR.load(folder, components) -> encode, generate, caption
    from uniar_backend.decoder import load_decoder
    python -m uniar_backend --help           # CLI
"""

__version__ = "0.1.0"
