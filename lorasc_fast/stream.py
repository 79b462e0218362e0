"""The library's random stream, in plain torch integer arithmetic.

Counter-based Philox4x32-10 (Salmon et al., SC'11; the generator behind Triton's
``tl.randint4x``), keyed by the 64-bit seed. Element ``e`` of a logical row-major
matrix with ``cols`` columns, ``e = (row_offset + i) * cols + j``, takes a 32-bit word
made of two independent 16-bit fields, from group ``g = e // 8`` and slot ``s = e % 8``:

* the high half drives the noise: the 16-bit half of word ``s // 2`` of
  ``philox(key=(seed_lo, seed_hi), counter=(g_lo, g_hi, 0, 0))`` (its high half for even
  ``s``, low half for odd), giving ``U = (hi + 0.5) / 2**16`` in (0, 1), symmetric about
  1/2, so ``U - 0.5`` has mean exactly zero;
* the low half drives stochastic rounding: the same half of
  ``philox(key, counter=(g_lo, g_hi, 1, 0))``, ``u = lo / 2**16`` in [0, 1).

One Philox call serves eight elements' noise (the kernels skip the rounding call under
nearest rounding, the default); the value depends only on (seed, e), never on tiles,
grids, strides, dtype or device. For ``g < 2**32`` the noise counter equals Triton's
``tl.randint4x(seed, g)``.

The Triton kernels (``lorasc_fast.kernels.common``) compute the same words bit for
bit; this module is the spec they are tested against and the generator of the
memory-lean torch path. Integer tensors are int64 holding unsigned 32-bit values;
a 32x32-bit product is split into 16-bit limbs so nothing overflows int64.
Memory: per Philox call about ten int64 temporaries of ``n / 8`` elements; at the peak about
three int64 tensors of ``n`` elements (the words, one call's halves and their stacking).
"""
from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

NOISE_CENTER = 32767.5  # (hi + 0.5) - 2**15 == hi - 32767.5
INV_2_16 = 1.0 / 65536.0


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of constant ``a`` and ``b``."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32-10 on int64 tensors holding uint32 counters; returns four such tensors."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & MASK32, seed >> 32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _halves(seed: int, g: torch.Tensor, c2: int) -> torch.Tensor:
    """The eight 16-bit halves of ``philox(seed, (g lo, g hi, c2, 0))`` per group, in slot
    order (word 0's high half, word 0's low half, word 1's high half, ...)."""
    r = philox4x32(seed, g & MASK32, g >> 32, torch.full_like(g, c2), torch.zeros_like(g))
    n = torch.stack(r, dim=1)
    return torch.stack([n >> 16, n & 0xFFFF], dim=2).reshape(-1)


def words(seed: int, start: int, count: int, device=None, *, rounding: bool = True) -> torch.Tensor:
    """The stream's 32-bit words for linear element indices ``[start, start + count)``.

    Returned as int64 tensor of values in [0, 2**32). ``rounding=False`` leaves the low
    (stochastic-rounding) halves zero and skips their Philox calls. Memory: O(count) int64.
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    g0 = start >> 3
    g1 = (start + count - 1) >> 3
    g = torch.arange(g0, g1 + 1, dtype=torch.int64, device=device)
    w = _halves(seed, g, 0) << 16
    if rounding:
        w |= _halves(seed, g, 1)
    first = start - 8 * g0
    return w[first:first + count]


def matrix_words(seed: int, rows: int, cols: int, row_offset: int = 0, device=None, *,
                 rounding: bool = True) -> torch.Tensor:
    """Words of a ``rows x cols`` block whose first row is global row ``row_offset``."""
    return words(seed, row_offset * cols, rows * cols, device,
                 rounding=rounding).reshape(rows, cols)


def noise_from_words(w: torch.Tensor, noise: float) -> torch.Tensor:
    """fp32 ``noise * (U - 0.5)`` from words: ``((hi - 32767.5) / 2**16) * noise``.

    The first product is exact (a power-of-two scaling of a half-integer), so the
    value is one fp32 rounding of the exact product, as in the kernels.
    """
    hi = (w >> 16).to(torch.float32)
    centred = (hi - NOISE_CENTER) * INV_2_16
    return centred * torch.tensor(noise, dtype=torch.float32, device=w.device)


def rounding_fraction(w: torch.Tensor) -> torch.Tensor:
    """The low 16 bits of each word, the stochastic-rounding draw (int64 in [0, 65536))."""
    return w & 0xFFFF
