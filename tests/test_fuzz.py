"""Property-based fuzzing of every parser that reads untrusted files: tokens files, config.json, safetensors headers,
checkpoint index files and images.  Each input either parses or raises the pack's own clear error
(``UniARError``: InputError / CheckpointError / TokenError), never another exception, and within a bounded time.

The examples per test are set by ``UNIAR_FUZZ_EXAMPLES`` (default 60; the closing note reports a longer run)."""

import io
import json
import os
import shutil
import struct
import time

import pytest
import torch
from conftest import ckpt_path

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from uniar_backend.errors import UniARError  # noqa: E402

EXAMPLES = int(os.environ.get("UNIAR_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIME_LIMIT = 5.0  # seconds per parse: a hostile file may not make the parser spin
SRC = ckpt_path("uniar-tiny")


def parses_or_refuses(fn, *args):
    t0 = time.perf_counter()
    try:
        fn(*args)
    except UniARError:
        pass
    assert time.perf_counter() - t0 < TIME_LIMIT, "a parser took too long on a hostile input"


# ---------------------------------------------------------------------------------------------- building blocks
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), c, max_size=4)),
                           max_leaves=12)


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "I64", "I32", "BF16", "U8", "BOOL", "F8_E4M3", "X", 7]),
    "shape": st.one_of(st.lists(st.integers(-3, 70000), max_size=5), st.text(max_size=3)),
    "data_offsets": st.one_of(st.tuples(st.integers(-5, 300), st.integers(-5, 300)).map(list), st.none()),
})
headers = st.dictionaries(st.sampled_from(["indices", "a", "b.weight", "__metadata__"]),
                          st.one_of(tensor_entries, json_values), max_size=3)
token_meta = st.fixed_dictionaries({
    "format": st.sampled_from(["uniar.visual_tokens", "x"]), "version": st.sampled_from(["1", "2"]),
    "ar_height": st.sampled_from(["64", "0", "-32", "8192", "65", "abc", str(2**40)]),
    "ar_width": st.sampled_from(["64", "96", "100000"]), "bsq_dim": st.sampled_from(["16", "64", "0", "65"]),
    "levels": st.sampled_from(["4", "0", "99"]), "merge_unit": st.sampled_from(["4", "1", "1000"]),
})


# ---------------------------------------------------------------------------------------------- safetensors
@FUZZ
@given(header=headers, data=st.binary(max_size=300), truncate=st.integers(0, 40))
def test_safetensors_headers(tmp_path, header, data, truncate):
    from uniar_backend.checkpoint import read_header

    blob = safetensors_bytes(header, data)
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob[: max(0, len(blob) - truncate)] if truncate % 3 == 0 else blob)
    parses_or_refuses(read_header, str(p))


@FUZZ
@given(blob=st.binary(max_size=64), length=st.integers(0, 2**64 - 1))
def test_safetensors_garbage(tmp_path, blob, length):
    from uniar_backend.checkpoint import read_header

    p = tmp_path / "g.safetensors"
    p.write_bytes(struct.pack("<Q", length) + blob)
    parses_or_refuses(read_header, str(p))


# ---------------------------------------------------------------------------------------------- tokens files
@FUZZ
@given(meta=token_meta, header=headers, shape=st.lists(st.integers(0, 20), min_size=0, max_size=5))
def test_tokens_files(tmp_path, meta, header, shape):
    from uniar_backend.tokens import VisualTokens, write_safetensors

    p = tmp_path / "t.safetensors"
    if sum(shape) % 2:
        numel = 1
        for s in shape:
            numel *= s
        write_safetensors(str(p), {"indices": torch.zeros(numel, dtype=torch.int64).view(*shape)
                                   if shape else torch.zeros((), dtype=torch.int64)}, meta)
    else:
        header = dict(header, __metadata__=meta)
        p.write_bytes(safetensors_bytes(header, b"\0" * 64))
    parses_or_refuses(VisualTokens.load, str(p))


# ---------------------------------------------------------------------------------------------- config / index
TEXT_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings"]
VISION_KEYS = ["depth", "hidden_size", "num_heads", "patch_size", "spatial_merge_size", "bsq_dim",
               "num_position_embeddings", "deepstack_visual_indexes", "temporal_patch_size"]


@FUZZ
@given(section=st.sampled_from(["text_config", "vision_config", None]), key=st.sampled_from(TEXT_KEYS + VISION_KEYS),
       value=json_values, drop=st.booleans())
def test_config_json(tmp_path, section, key, value, drop):
    from uniar_backend.config import UniARConfig

    cfg = json.load(open(os.path.join(SRC, "config.json")))
    target = cfg[section] if section else cfg
    if drop:
        target.pop(key, None)
    else:
        target[key] = value
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    parses_or_refuses(UniARConfig.from_file, str(p))


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    shutil.copy(os.path.join(SRC, "model.safetensors"), folder / "model-00001-of-00001.safetensors")
    return folder


@FUZZ
@given(index=st.one_of(json_values, st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=30), st.one_of(st.sampled_from(["model-00001-of-00001.safetensors", "../x.safetensors",
                                                     "/etc/passwd", "", "."]), json_scalars), max_size=4)})))
def test_index_files(shard_folder, index):
    from uniar_backend.checkpoint import WeightFiles

    (shard_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    parses_or_refuses(WeightFiles, str(shard_folder), "model")


# ---------------------------------------------------------------------------------------------- images
@FUZZ
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "raw"]),
       mode=st.sampled_from(["RGB", "L", "I;16", "I", "RGBA", "P", "1", "CMYK", "F"]),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)), cut=st.integers(0, 200))
def test_images(tmp_path, data, fmt, mode, size, cut):
    from PIL import Image

    from uniar_backend.preprocess import load_image

    p = tmp_path / "img.bin"
    if fmt == "raw":
        p.write_bytes(data)
    else:
        try:
            im = Image.frombytes(mode, size, (data * (1 + 40 * 40 * 16 // max(1, len(data))))[: 40 * 40 * 16])
            buf = io.BytesIO()
            im.save(buf, format=fmt)
        except (ValueError, OSError, KeyError, TypeError):
            return  # PIL cannot write this combination: nothing to read
        blob = buf.getvalue()
        p.write_bytes(blob[: len(blob) - cut] if cut < len(blob) and cut % 2 else blob)
    parses_or_refuses(load_image, str(p))
