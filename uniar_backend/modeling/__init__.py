"""Plain-PyTorch UniAR modules (Qwen3-VL text stack, SigLIP2/Qwen3-VL vision tower with BSQ, generation head).

Layer classes come from an *ops* namespace (``Linear``, ``LayerNorm``, ``Conv3d``, ``Embedding``), torch.nn by
default; ComfyUI passes ``comfy.ops`` so its low-VRAM weight streaming and dtype casting apply.
"""
