"""Error types of the UniAR backend.

Every error the library raises on purpose is a :class:`UniARError`: its message says what is wrong and how to
fix it.  The CLI prints it as one line and exits non-zero; the ComfyUI nodes let it propagate so that it shows up
in the UI and in ``/history``.
"""

from __future__ import annotations


class UniARError(Exception):
    """Base class: a user-facing error with an actionable message."""


class CheckpointError(UniARError):
    """A checkpoint folder or file is missing, incomplete, corrupt or not a UniAR checkpoint."""


class InputError(UniARError, ValueError):
    """An argument (size, prompt, image, value range) is not usable."""


class TokenError(UniARError):
    """Visual tokens are malformed or were produced by an incompatible model."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch reports exhausted memory as MemoryError, torch.OutOfMemoryError (CUDA / MPS) or a RuntimeError of the
    CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, MemoryError):
        return True
    name = type(e).__name__
    text = str(e)
    return name == "OutOfMemoryError" or "out of memory" in text.lower() or "can't allocate memory" in text
