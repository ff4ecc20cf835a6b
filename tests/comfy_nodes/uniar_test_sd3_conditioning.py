"""Test helper (copied into custom_nodes/ by tests/test_comfyui_native.py): a plain SD3-shaped CONDITIONING, as
CLIPTextEncodeSD3 makes one, without loading text encoders.  Registers one node, ``UniARTestSD3Conditioning``."""
import torch


class UniARTestSD3Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"length": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
                             "pooled": ("INT", {"default": 2048, "min": 1, "max": 8192}),
                             "value": ("FLOAT", {"default": 0.1, "min": -10.0, "max": 10.0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, length, width, pooled, value):
        return ([[torch.full((1, length, width), float(value)), {"pooled_output": torch.full((1, pooled), float(value))}]],)


NODE_CLASS_MAPPINGS = {"UniARTestSD3Conditioning": UniARTestSD3Conditioning}
