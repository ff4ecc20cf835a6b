"""The UniAR ComfyUI nodes (V3 API).

Importing this package is free: the node modules (which need ComfyUI's ``comfy_api``) are imported by
``extension.py``, which the pack's ``comfy_entrypoint`` loads when ComfyUI asks for the node list.
``common.py`` holds the ComfyUI-free logic (tested without ComfyUI).
"""
