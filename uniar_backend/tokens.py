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
from .errors import TokenError
from .limits import TOKEN_PIXELS as PATCH_PER_TOKEN  # one merged token covers 32x32 pixels

FORMAT = "uniar.visual_tokens"
VERSION = "1"


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
        for name in ("ar_height", "ar_width"):
            v = getattr(self, name)
            if v <= 0 or v % PATCH_PER_TOKEN:
                raise TokenError(f"visual tokens: {name}={v} is not a positive multiple of {PATCH_PER_TOKEN}")
        if not 1 <= self.bsq_dim <= 64:
            raise TokenError(f"visual tokens: bsq_dim={self.bsq_dim} is outside 1..64")
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
        """Write the tokens atomically (a temporary file in the same folder, then rename)."""
        from safetensors.torch import save_file

        from .fileio import atomic_path

        path = os.fspath(path)
        with atomic_path(path, prefix=".uniar_tokens_") as tmp:
            save_file({"indices": self.indices.detach().to("cpu", torch.int64).contiguous()}, tmp,
                      metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VisualTokens":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenError(f"visual tokens file not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                if "indices" not in keys:
                    raise TokenError(f"{path}: no tensor 'indices' (found {keys}); not a UniAR visual tokens file")
                indices = f.get_tensor("indices")
        except TokenError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise TokenError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise TokenError(
                f"{path}: metadata format={meta.get('format')!r}, expected {FORMAT!r}; not a UniAR visual tokens file"
            )
        if meta.get("version") != VERSION:
            raise TokenError(f"{path}: tokens file version {meta.get('version')!r} is not supported (need {VERSION})")
        try:
            fields = {k: int(meta[k]) for k in ("ar_height", "ar_width", "bsq_dim", "levels", "merge_unit")}
        except (KeyError, ValueError) as e:
            raise TokenError(f"{path}: missing or invalid metadata field ({e})") from None
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
