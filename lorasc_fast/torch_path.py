"""The memory-lean torch implementation of the ops (the default off CUDA).

W is updated in row chunks: the chunk's low-rank product ``(X @ Y) * scale`` (PEFT's
order of operations, so an fp32 merge equals PEFT's bit for bit) is added in place; a
bf16/fp16 W is widened one chunk at a time. Noise words come from
``lorasc_fast.stream`` for the chunk only. A chunk is a multiple of 8 rows, at most
``MAX_CHUNK_ELEMS`` elements (``MAX_CHUNK_ELEMS_PLAIN`` without random words), and all its
temporaries together take at most 1/8 of ``W.nbytes`` unless the 8-row minimum is larger
(``tests/test_memory.py`` measures the peak). Results follow the same arithmetic contract as
``lorasc_fast.reference`` (fp32 math, one rounding to W's dtype; same random stream).
``merged_finite`` walks W the same way, read-only (the dry run of PEFT's safe merge).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import stream
from .reference import round_fp32

MAX_CHUNK_ELEMS = 1 << 16  # with random words
MAX_CHUNK_ELEMS_PLAIN = 1 << 18  # a plain merge
# bytes of temporaries alive at once per chunk element (peak RSS, bf16 W, 4096 columns): the
# torch Philox rounds in int64, the words, the rounding fractions and the fp32 values take
# ~100; a plain merge the fp32 delta and the widened chunk, ~10; a plain merge into fp32 W
# only the delta (added in place), 4
TEMP_BYTES_WORDS = 128
TEMP_BYTES_PLAIN = 12
TEMP_BYTES_PLAIN_FP32 = 4


def chunk_rows(W: torch.Tensor, words: bool = True, temp_bytes: int | None = None) -> int:
    """Rows per chunk: one chunk's temporaries (``temp_bytes`` per element; by default those
    of a merge with or without random ``words``) together stay within W.nbytes / 8, and a
    chunk is a multiple of 8 rows (at least 8), which keeps BLAS on the same micro-kernel
    grouping as one product over all rows: chunked results equal PEFT's unchunked
    ``(B @ A) * s`` bit for bit."""
    cols = max(1, W.shape[1])
    if temp_bytes is None:
        temp_bytes = TEMP_BYTES_WORDS if words else TEMP_BYTES_PLAIN
    cap = MAX_CHUNK_ELEMS if words else MAX_CHUNK_ELEMS_PLAIN
    budget = min(cap, W.numel() * W.element_size() // 8 // temp_bytes)
    return max(8, budget // cols // 8 * 8)


def row_chunks(W: torch.Tensor, words: bool = True, temp_bytes: int | None = None):
    """The ``(r0, r1)`` row ranges of W's chunks, ``chunk_rows(W, words, temp_bytes)`` rows
    each."""
    rows, step = W.shape[0], chunk_rows(W, words, temp_bytes)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _factors(A, B, fan_in_fan_out):
    """(X, Y) with W += scale * X @ Y."""
    return (A.T, B.T) if fan_in_fan_out else (B, A)


def _apply(W, X, Y, scale, noise, seed, row_offset, rounding):
    cols = W.shape[1]
    Yf = Y.float() if Y is not None else None
    need_words = noise != 0.0 or (rounding == "stochastic" and W.dtype != torch.float32)
    buf = None
    # a plain merge into fp32 W keeps only the delta: chunks three times longer than bf16's
    # (fewer, larger BLAS calls; PEFT's 1024 x 1024 fp32 merge was faster than 26 chunks)
    temp_bytes = TEMP_BYTES_PLAIN_FP32 if not need_words and W.dtype == torch.float32 else None
    for r0, r1 in row_chunks(W, need_words, temp_bytes):
        Wc = W[r0:r1]
        # PEFT's order: (B @ A) * s in fp32, added to W (bit-identical to PEFT for fp32 W; an
        # in-place add into bf16/fp16 W computes in fp32 and rounds once)
        delta = None
        if X is not None:
            if buf is None:  # the first chunk is the largest: one delta buffer for all chunks
                buf = torch.empty(r1 - r0, cols, dtype=torch.float32, device=W.device)
            delta = torch.mm(X[r0:r1].float(), Yf, out=buf[:r1 - r0]).mul_(scale)
        if not need_words:  # a plain merge (or a zero-noise, nearest add_noise_: nothing to do)
            if delta is not None:
                Wc.add_(delta)
            continue
        v = Wc if W.dtype == torch.float32 else Wc.float()
        if delta is not None:
            v.add_(delta)
        w = stream.words(seed, (row_offset + r0) * cols, (r1 - r0) * cols, W.device,
                         rounding=rounding == "stochastic").view(r1 - r0, cols)
        if noise != 0.0:
            v.add_(stream.noise_from_words(w, noise))
        if W.dtype != torch.float32:
            Wc.copy_(round_fp32(v, W.dtype, rounding, stream.rounding_fraction(w)))
    return W


def merge_(W, A, B, *, scale, noise, seed, row_offset, rounding, fan_in_fan_out):
    X, Y = _factors(A, B, fan_in_fan_out)
    return _apply(W, X, Y, scale, noise, seed, row_offset, rounding)


def add_noise_(W, noise, *, seed, row_offset, rounding):
    return _apply(W, None, None, 1.0, noise, seed, row_offset, rounding)


def merged_finite(W, A, B, *, scale, fan_in_fan_out, post=None) -> bool:
    """Whether ``post * (W + scale * B @ A)``, formed in fp32 and rounded to W's dtype, is
    finite everywhere; W is only read.

    ``post``: an optional fp32 per-output-feature vector (a DoRA factor). Row chunks as in
    a plain merge: the chunk's fp32 copy, its rounding and flags (<= 7 bytes an element)
    stay within W.nbytes / 8. One host sync.
    """
    X, Y = _factors(A, B, fan_in_fan_out)
    Yf = Y.float()
    ok = torch.ones((), dtype=torch.bool, device=W.device)
    for r0, r1 in row_chunks(W, words=False):
        v = W[r0:r1].to(torch.float32, copy=True)
        v.addmm_(X[r0:r1].float(), Yf, alpha=scale)
        if post is not None:
            v.mul_(post.view(1, -1) if fan_in_fan_out else post[r0:r1].view(-1, 1))
        ok &= torch.isfinite(v.to(W.dtype)).all()
    return bool(ok)


def _ema_value(s, f, alpha):
    """``alpha * s + (1 - alpha) * f`` in fp32 as ``torch.lerp`` forms it: the values ``ema_``
    computes (and stores, for fp32 slow factors), so the moments taken on the fly match."""
    return torch.lerp(s.float(), f.float(), 1.0 - alpha)


def lowrank_moments(A, B, scale, *, ema=None):
    """Mean and unbiased std of ``scale * B @ A`` from fp64 r x r Grams.

    ``ema=(A_fast, B_fast, alpha)`` takes the factors as their EMA with the fast ones.
    Memory: fp64 copies of the factors (factor-sized), r x r Grams.
    """
    if ema is not None:
        A_f, B_f, alpha = ema
        A, B = _ema_value(A, A_f, alpha), _ema_value(B, B_f, alpha)
    A64, B64 = A.double(), B.double()
    return moments_from_grams(B64.T @ B64, B64.sum(0), B.shape[0], A64, scale)


def moments_from_grams(gram_x, sum_x, rows, Y, scale):
    """Mean and unbiased std (0-d fp32) of ``M = scale * X @ Y`` (X: rows x r, Y: r x cols)
    from X's fp64 Gram ``X^T X`` and column sums ``1^T X`` and the fp64 Y:

    ``sum(M) = s (1^T X)(Y 1)``, ``||M||^2 = s^2 sum((X^T X) * (Y Y^T))``, ``n = rows * cols``,
    ``var = max(||M||^2 - sum(M)^2 / n, 0) / max(n - 1, 1)``.

    ``rows``: an int, or a 0-d fp64 tensor (a row count summed over ranks, kept on the device:
    no read-back). Memory: r x r.
    """
    n = rows * Y.shape[1]
    total = scale * torch.dot(sum_x, Y.sum(1))
    sumsq = scale * scale * (gram_x * (Y @ Y.T)).sum()
    mean = total / n
    dof = (n - 1).clamp_min(1) if isinstance(n, torch.Tensor) else max(n - 1, 1)
    var = (sumsq - total * mean).clamp_min(0.0) / dof
    return mean.float(), var.sqrt().float()


def ema_(slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float) -> None:
    """fp32 pairs in one ``_foreach_lerp_`` (``s + (1 - alpha) (f - s)``); others widened per pair."""
    same = [(s, f) for s, f in zip(slow, fast) if s.dtype == f.dtype == torch.float32]
    if same:
        torch._foreach_lerp_([s for s, _ in same], [f for _, f in same], 1.0 - alpha)
    for s, f in zip(slow, fast):
        if not s.dtype == f.dtype == torch.float32:
            s.copy_(_ema_value(s, f, alpha))
