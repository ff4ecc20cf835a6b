"""Every JSON the pack parses from a file goes through here: bounded in size, and any parse failure (syntax, bad
UTF-8, nesting deep enough to exhaust the parser's recursion, a number too long for ``int``) becomes one
:class:`~uniar_backend.errors.UniARError` that names the file, never a raw ``RecursionError`` or ``TypeError``.

The files: ``config.json`` and the other configs of a checkpoint, the shard index, a processor's
``chat_template.json``, the JSON header of a ``.safetensors`` file (checkpoints, and the tokens files that
ComfyUI's Load Tokens reads from ``input/``), the ``comfy_quant`` marker of a quantised layer."""

from __future__ import annotations

import json
import os

from .errors import CheckpointError

# Real UniAR configs are a few KB and its shard index under 100 KB; 16 MiB leaves room for any honest file and
# keeps a hostile one from filling memory.
MAX_JSON_FILE = 16 << 20


def parse_json(raw: bytes | str, where: str, fix: str = "", error=CheckpointError, max_bytes: int = MAX_JSON_FILE,
               want=None):
    """``raw`` parsed, or one ``error`` naming ``where`` (and ending in ``fix``).  ``want``: the type the top
    level must have (e.g. ``dict``)."""
    tail = f"; {fix}" if fix else ""
    if len(raw) > max_bytes:
        raise error(f"{where}: {len(raw)} bytes of JSON, more than the {max_bytes} this file may have{tail}")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply){tail}") from None
    except (ValueError, UnicodeDecodeError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{where}: not valid JSON ({str(e)[:200]}){tail}") from None
    if want is not None and not isinstance(data, want):
        kind = {dict: "object", list: "array"}.get(want, want.__name__)
        raise error(f"{where}: expected a JSON {kind}, found {type(data).__name__}{tail}")
    return data


def read_json_file(path: str, fix: str = "", error=CheckpointError, max_bytes: int = MAX_JSON_FILE, want=dict):
    """The JSON in ``path`` (a JSON object by default), read no further than ``max_bytes`` + 1 bytes."""
    tail = f"; {fix}" if fix else ""
    if not os.path.isfile(path):
        raise error(f"missing file: {path}{tail}")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e}){tail}") from None
    return parse_json(raw, path, fix, error, max_bytes, want)
