"""Binary Spherical Quantization (BSQ) index <-> bit conventions of UniAR.

A visual token holds ``levels x merge_unit`` codes of ``bsq_dim`` bits.  The reference stores each code as one
int64 *index*: ``index = sum_k bit_k * 2**(d-1-k)`` computed in int64 (bit 0 = most significant; for d = 64 the
top weight ``2**63`` wraps to ``-2**63``, so indices are the two's-complement value of the MSB-first bit string).

Going back from an index to bits, the reference (``BinarySphericalQuantizer.indexes_to_codes``) uses floor
division by the (wrapped) basis and, for d == 64 only, flips bit 0 afterwards.  That gives the right top bit for
every index except two: index ``0`` decodes with its top bit set and index ``-2**63`` with it cleared (they swap).
The reference feeds these decoded bits to the image decoder and, when it tokenises an image, to the LLM, so a
faithful port must reproduce the quirk: :func:`indices_to_bits` does (``exact=False``, the default).
:func:`indices_to_bits` with ``exact=True`` gives the mathematically correct bits (used only for inspection).
"""

from __future__ import annotations

import torch


def basis(bsq_dim: int, device=None) -> torch.Tensor:
    """``2**(d-1-k)`` for k = 0..d-1 in int64 (for d = 64 the first entry wraps to -2**63), as the checkpoint."""
    if not 1 <= bsq_dim <= 64:
        raise ValueError(f"bsq_dim must be in 1..64, got {bsq_dim}")
    exps = torch.arange(bsq_dim - 1, -1, -1, dtype=torch.int64, device=device)
    # 1 << 63 overflows to -2**63 in int64, exactly like ``2 ** torch.arange(63, -1, -1)`` in the reference.
    return torch.bitwise_left_shift(torch.ones_like(exps), exps)


def bits_to_indices(bits: torch.Tensor) -> torch.Tensor:
    """Bits ``{0,1}`` of shape ``(..., d)`` -> int64 indices ``(...)`` (MSB first, int64 wrap-around)."""
    b = basis(bits.shape[-1], device=bits.device)
    return (bits.to(torch.int64) * b).sum(dim=-1)


def indices_to_bits(indices: torch.Tensor, bsq_dim: int, exact: bool = False) -> torch.Tensor:
    """int64 indices ``(...)`` -> bits ``{0,1}`` int64 ``(..., d)``.

    ``exact=False`` reproduces the reference codec including its d == 64 quirk (see module doc);
    ``exact=True`` returns the plain two's-complement bits.
    """
    indices = indices.to(torch.int64)
    if exact:
        shifts = torch.arange(bsq_dim - 1, -1, -1, dtype=torch.int64, device=indices.device)
        return torch.bitwise_and(torch.bitwise_right_shift(indices.unsqueeze(-1), shifts), 1)
    b = basis(bsq_dim, device=indices.device)
    bits = torch.remainder(torch.floor_divide(indices.unsqueeze(-1), b), 2)
    if bsq_dim == 64:
        bits[..., :1] = 1 - bits[..., :1]
    return bits


def bits_to_codes(bits: torch.Tensor, bsq_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Bits -> code vectors ``(2b - 1) / sqrt(d)``.

    The reference hard-casts the codes to bfloat16 (exact for d = 16 and 64, where 1/sqrt(d) is a power of two)
    before the output projections; we compute them in bfloat16 the same way and cast to ``dtype``.
    """
    codes = (bits.to(torch.bfloat16) * 2 - 1) * (1.0 / bsq_dim**0.5)
    return codes.to(torch.bfloat16).to(dtype)
