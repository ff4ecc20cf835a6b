"""Image preprocessing equals the reference's (Qwen3-VL fast processor; edit-mode qwen-vl-utils step)."""

import pytest
import torch
from conftest import CKPTS, TEST_IMAGE, ckpt_path, golden

from uniar_backend.errors import InputError
from uniar_backend.preprocess import (ProcessorConfig, _qwen_utils_smart_resize, image_to_uint8, load_image,
                                      prepare_edit_image, processor_patches, smart_resize)


@pytest.mark.parametrize("name", CKPTS)
def test_processor_patches_exact(name):
    cfg = ProcessorConfig.from_file(ckpt_path(name) + "/preprocessor_config.json")
    g = golden(name, "a_bsq_tokenize")
    pv, grid, _ = processor_patches(load_image(TEST_IMAGE), cfg)
    assert list(grid) == g["a1.image_grid_thw"][0].tolist()
    assert torch.equal(pv, g["a1.pixel_values"])


@pytest.mark.parametrize("name", CKPTS)
def test_edit_image_preparation_exact(name):
    cfg = ProcessorConfig.from_file(ckpt_path(name) + "/preprocessor_config.json")
    g = golden(name, "c1_edit_64x64_cfg1.5")
    pil = prepare_edit_image(load_image(TEST_IMAGE), 64, 64)
    assert pil.size == (56, 56)  # qwen-vl-utils rounds 64x64 to multiples of 28
    pv, grid, _ = processor_patches(pil, cfg)
    assert list(grid) == g["input_image_grid_thw"][0].tolist()
    assert torch.equal(pv, g["pixel_values"][: pv.shape[0]])


def test_qwen_utils_resize_example():
    assert _qwen_utils_smart_resize(96, 64, 28, 4 * 28 * 28, 16384 * 28 * 28) == (84, 56)
    assert smart_resize(96, 128, 32, 4096, 16128) == (96, 128)
    assert smart_resize(96, 128, 32, 65536, 16777216) == (224, 320)


def test_comfy_float_image_roundtrip():
    u8 = image_to_uint8(load_image(TEST_IMAGE))
    as_float = u8.permute(1, 2, 0).float() / 255.0  # how ComfyUI's LoadImage builds IMAGE tensors
    assert torch.equal(image_to_uint8(as_float), u8)


def test_rgba_composited_on_white():
    from PIL import Image

    im = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert image_to_uint8(im)[:, 0, 0].tolist() == [255, 255, 255]


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(str(bad))
    with pytest.raises(InputError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
