"""The UniAR ComfyUI nodes (V3 API).

Importing this package is free: the node modules (which need ComfyUI's ``comfy_api``) are imported by
``extension.py``, which the pack's ``comfy_entrypoint`` loads when ComfyUI asks for the node list.
Modules by concern: the nodes (``loader``, ``generate``, ``decode``, ``caption``, ``tokens``), ComfyUI glue
(``model_management``, ``compat``, ``extension``) and ComfyUI-free helpers tested without ComfyUI
(``checkpoints``, ``sizes``, ``images``, ``token_files``, ``bit_preview``).
"""
