"""The UniAR visual-token type and its ``.safetensors`` file format.

``VisualTokens.indices`` is int64 ``[B, N, levels, merge_unit]``, exactly what the reference ``generate_visual``
returns: ``N = (ar_height / 32) * (ar_width / 32)`` merged tokens in raster order of the 2x2 merge windows, each
holding ``levels`` (final + DeepStack) x ``merge_unit`` (2x2 sub-patches) BSQ indices of ``bsq_dim`` bits.

File format: one tensor ``indices`` plus string metadata ``format=uniar.visual_tokens``, ``version=1``,
``ar_height``, ``ar_width``, ``bsq_dim``, ``levels``, ``merge_unit``, ``fingerprint``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import bsq
from .checkpoint import read_header, write_safetensors  # noqa: F401  (write_safetensors: also public here)
from .errors import CheckpointError, TokenError
from .limits import MAX_LEVELS, MAX_MERGE_UNIT, MAX_SIDE, MAX_TOKEN_BATCH
from .limits import TOKEN_PIXELS as PATCH_PER_TOKEN  # one merged token covers 32x32 pixels

FORMAT = "uniar.visual_tokens"
VERSION = "1"


def check_layout(ar_height, ar_width, bsq_dim, levels, merge_unit, batch) -> None:
    """The limits every tokens value obeys (made here, or read from a shared file): the same as for user input,
    so a file cannot ask for more work or memory than a user could."""
    for name, v in (("ar_height", ar_height), ("ar_width", ar_width)):
        if v <= 0 or v % PATCH_PER_TOKEN:
            raise TokenError(f"visual tokens: {name}={v} is not a positive multiple of {PATCH_PER_TOKEN}")
        if v > MAX_SIDE:
            raise TokenError(f"visual tokens: {name}={v} is larger than {MAX_SIDE} pixels, the largest UniAR size")
    if not 1 <= bsq_dim <= 64:
        raise TokenError(f"visual tokens: bsq_dim={bsq_dim} is outside 1..64")
    if not 1 <= levels <= MAX_LEVELS or not 1 <= merge_unit <= MAX_MERGE_UNIT:
        raise TokenError(f"visual tokens: levels={levels} / merge_unit={merge_unit} outside 1..{MAX_LEVELS} / "
                         f"1..{MAX_MERGE_UNIT}")
    if not 1 <= batch <= MAX_TOKEN_BATCH:
        raise TokenError(f"visual tokens hold {batch} images; a tokens value holds 1..{MAX_TOKEN_BATCH}")


@dataclass
class VisualTokens:
    indices: torch.Tensor
    ar_height: int
    ar_width: int
    bsq_dim: int
    levels: int
    merge_unit: int
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        t = self.indices
        if not isinstance(t, torch.Tensor):
            raise TokenError("visual tokens: 'indices' must be a torch tensor")
        if t.dtype != torch.int64:
            raise TokenError(f"visual tokens: 'indices' must be int64, got {t.dtype}")
        if t.dim() != 4:
            raise TokenError(
                f"visual tokens: 'indices' must have shape [B, N, levels, merge_unit], got {list(t.shape)}"
            )
        check_layout(self.ar_height, self.ar_width, self.bsq_dim, self.levels, self.merge_unit, t.shape[0])
        n = (self.ar_height // PATCH_PER_TOKEN) * (self.ar_width // PATCH_PER_TOKEN)
        if t.shape[1] != n or t.shape[2] != self.levels or t.shape[3] != self.merge_unit:
            raise TokenError(
                f"visual tokens: indices shape {list(t.shape)} does not match "
                f"{self.ar_height}x{self.ar_width} (N={n}), levels={self.levels}, merge_unit={self.merge_unit}"
            )
        if self.bsq_dim < 64 and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= 2**self.bsq_dim:
                raise TokenError(
                    f"visual tokens: indices span [{lo}, {hi}], outside the {self.bsq_dim}-bit range "
                    f"[0, {2**self.bsq_dim - 1}]: the file is corrupt or its bsq_dim metadata is wrong"
                )

    def check_compatible(self, bsq_dim: int, levels: int, merge_unit: int, fingerprint: str = "",
                         what: str = "this model") -> list[str]:
        """Raise :class:`TokenError` if the tokens cannot be read by a model with these code settings.

        Returns a list of warnings (a different model fingerprint with compatible settings is allowed: the
        UniAR-SFT and UniAR-RL checkpoints share their visual tokenizer).
        """
        mine = (self.bsq_dim, self.levels, self.merge_unit)
        theirs = (bsq_dim, levels, merge_unit)
        if mine != theirs:
            raise TokenError(
                "visual tokens were made by an incompatible model: tokens have bsq_dim/levels/merge_unit = "
                f"{mine}, {what} expects {theirs}. Re-create the tokens with {what} (encode the image again)."
            )
        warnings = []
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            warnings.append(
                f"visual tokens come from another checkpoint (fingerprint {self.fingerprint[:12]} vs "
                f"{fingerprint[:12]}); the code layout matches, so they are used as they are"
            )
        return warnings

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return int(self.indices.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of merged tokens."""
        return self.ar_height // PATCH_PER_TOKEN, self.ar_width // PATCH_PER_TOKEN

    def bits(self) -> torch.Tensor:
        """Bits ``[B, N, levels, merge_unit, bsq_dim]`` as the reference decodes them (64-bit quirk included)."""
        return bsq.indices_to_bits(self.indices, self.bsq_dim)

    def select(self, i: int) -> "VisualTokens":
        return self._with(self.indices[i : i + 1])

    def _with(self, indices: torch.Tensor) -> "VisualTokens":
        return VisualTokens(indices, self.ar_height, self.ar_width, self.bsq_dim, self.levels, self.merge_unit,
                            self.fingerprint, dict(self.extra))

    @staticmethod
    def cat(items: list["VisualTokens"]) -> "VisualTokens":
        if not items:
            raise TokenError("cannot concatenate an empty list of visual tokens")
        first = items[0]
        for other in items[1:]:
            if (other.ar_height, other.ar_width, other.bsq_dim, other.levels, other.merge_unit) != (
                first.ar_height, first.ar_width, first.bsq_dim, first.levels, first.merge_unit
            ):
                raise TokenError("cannot batch visual tokens of different sizes or code layouts")
        return first._with(torch.cat([t.indices.cpu() for t in items], dim=0))

    # ------------------------------------------------------------------ file I/O
    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "ar_height": str(self.ar_height),
            "ar_width": str(self.ar_width),
            "bsq_dim": str(self.bsq_dim),
            "levels": str(self.levels),
            "merge_unit": str(self.merge_unit),
            "fingerprint": self.fingerprint,
        }
        for k, v in self.extra.items():
            meta.setdefault(str(k), str(v))
        return meta

    def save(self, path: str | os.PathLike) -> str:
        """Write the tokens atomically (a temporary file in the same folder, then rename).  The same tokens give
        the same bytes (sorted header), so ``cmp`` and hash-based caches work."""
        from .fileio import atomic_path

        path = os.fspath(path)
        with atomic_path(path, prefix=".uniar_tokens_") as tmp:
            self.write(tmp)
        return path

    def write(self, path: str | os.PathLike) -> None:
        """Write the file at ``path`` directly (callers that manage their own temporary files; else :meth:`save`)."""
        write_safetensors(os.fspath(path), {"indices": self.indices.detach().to("cpu", torch.int64).contiguous()},
                          self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VisualTokens":
        """Read a tokens file; its header is checked (integrity, dtype, shape and the metadata's sizes against
        the limits) before the tensor is read, so a file cannot make this allocate more than a valid one."""
        from safetensors import safe_open

        from .fileio import check_input_file

        path = check_input_file(os.fspath(path), "visual tokens file", TokenError)
        try:
            header = read_header(path, fix="it is not a valid tokens file")
        except CheckpointError as e:
            raise TokenError(str(e)) from None
        meta = header.get("__metadata__") or {}
        keys = [k for k in header if k != "__metadata__"]
        if "indices" not in keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise TokenError(f"{path}: no tensor 'indices' (found {shown or 'none'}); not a UniAR visual tokens file")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise TokenError(
                f"{path}: metadata format={str(fmt)[:40]!r}, expected {FORMAT!r}; not a UniAR visual tokens file"
            )
        if meta.get("version") != VERSION:
            raise TokenError(f"{path}: tokens file version {str(meta.get('version'))[:20]!r} is not supported "
                             f"(need {VERSION})")
        try:
            fields = {k: int(meta[k]) for k in ("ar_height", "ar_width", "bsq_dim", "levels", "merge_unit")}
        except (KeyError, ValueError, TypeError) as e:
            raise TokenError(f"{path}: missing or invalid metadata field ({str(e)[:80]})") from None
        info = header["indices"]
        shape = info["shape"]
        try:
            check_layout(**fields, batch=shape[0] if len(shape) == 4 else 1)
        except TokenError as e:
            raise TokenError(f"{path}: {e}") from None
        n = (fields["ar_height"] // PATCH_PER_TOKEN) * (fields["ar_width"] // PATCH_PER_TOKEN)
        if info["dtype"] != "I64" or shape[1:] != [n, fields["levels"], fields["merge_unit"]]:
            raise TokenError(f"{path}: 'indices' is {info['dtype']} {shape}, expected I64 [B, {n}, "
                             f"{fields['levels']}, {fields['merge_unit']}] for {fields['ar_height']}x"
                             f"{fields['ar_width']}; the file is corrupt")
        try:
            with safe_open(path, framework="pt") as f:
                indices = f.get_tensor("indices")
        except Exception as e:  # safetensors raises its own error types
            raise TokenError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {str(e)[:200]})") \
                from None
        known = {"format", "version", "fingerprint", *fields}
        extra = {k: v for k, v in meta.items() if k not in known}
        try:
            return cls(indices, fingerprint=meta.get("fingerprint", ""), extra=extra, **fields)
        except TokenError as e:
            raise TokenError(f"{path}: {e}") from None

    @classmethod
    def from_bits(cls, bits: torch.Tensor, ar_height: int, ar_width: int, fingerprint: str = "") -> "VisualTokens":
        """Bits ``[B, N, levels, merge_unit, d]`` -> tokens."""
        return cls(bsq.bits_to_indices(bits).cpu(), ar_height, ar_width, int(bits.shape[-1]), int(bits.shape[2]),
                   int(bits.shape[3]), fingerprint)
