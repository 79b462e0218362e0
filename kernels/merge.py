"""Fused in-place merge: ``W += scale * X @ Y + noise * (U - 0.5)``, rounded to W's dtype.

One pass over W. Program (n, m) owns the BLOCK_N columns of column block n and walks
the row blocks m, m + ROW_PROGRAMS, ... (ITERS steps; steps past the last row block
are fully masked): Y's R x BLOCK_N panel is loaded once per program and kept for the
whole walk, and the loop is software-pipelined (``NUM_STAGES``) so the next W tile is
in flight while the current one is computed. Per tile: the rank-R product of X's rows
and Y's panel with ``tl.dot`` (K zero-padded to R_PAD >= 16, 3xTF32 on pre-split operands,
``common.dot_3xtf32``: fp32-accurate; tensor cores instead of R FMAs per element, which
measured 2-5x slower on the H200; Y's split is done once per program),
the noise from the library's Philox stream (one Philox call per eight elements, one more
for the stochastic-rounding fractions),
rounding to W's dtype (nearest-even or stochastic) and the store. With the product, both
additions are explicit FMAs (``W + s * XY``, then ``+ noise``): one rounding each, the same
in every tile shape (left to the compiler, the contraction of a separate multiply and add
differed between tile shapes on the H200, and so did the rounded results).

With ``EVEN`` (the tile shape divides W and the row programs divide the row blocks, so
no step of any walk is out of bounds) the W tiles are neither masked nor padded: no
per-element predicate work.

X and Y are B and A (or A^T and B^T for ``fan_in_fan_out``), given by strides: no
transposed copy. Bytes moved: 2 * W.nbytes + the factors once per program. Extra
memory: none. ``HAS_DELTA=False`` is the noise-only op ``add_noise_``.
"""
import triton
import triton.language as tl

from .common import (centred_from_words, dot_3xtf32, load_f32, load_f32_unmasked,
                     noise_from_words, split_tf32, store_rounded, stream_words)


@triton.jit
def merge_panel(
    W, X, Y, M, N,
    stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn,
    scale, noise_scaled, seed, row_offset, pid_n, pid_m, ROW_PROGRAMS, ITERS, R,
    R_PAD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_NOISE: tl.constexpr,
    STOCHASTIC: tl.constexpr, W_KIND: tl.constexpr, ALIGNED8: tl.constexpr, EVEN: tl.constexpr,
    W_ALIGNED16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Column panel ``pid_n``, row blocks ``pid_m, pid_m + ROW_PROGRAMS, ...`` of one weight.

    ``W_ALIGNED16`` declares what a kernel argument's specialisation tells the compiler by
    itself: W's base and row stride (unit column stride) are 16-byte aligned, so its tiles
    move as 16-byte vectors through ``cp.async``. The grouped kernel reads W's address from
    a table and must declare it (without it: one 2-byte load and store per element)."""
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    k = tl.arange(0, R_PAD)
    if HAS_DELTA:
        y_hi, y_lo = split_tf32(tl.load(Y + k[:, None] * stride_yk + cols64[None, :] * stride_yn,
                                        mask=(k[:, None] < R) & col_ok[None, :],
                                        other=0.0).to(tl.float32))
    for i in tl.range(0, ITERS, num_stages=NUM_STAGES):
        rows = (pid_m + i * ROW_PROGRAMS) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        w_ptrs = W + rows64[:, None] * stride_wm + cols64[None, :] * stride_wn
        if W_ALIGNED16:
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        if EVEN:
            mask = None
            v = load_f32_unmasked(w_ptrs, W_KIND)
        else:
            mask = row_ok[:, None] & col_ok[None, :]
            v = load_f32(w_ptrs, mask, W_KIND)
        if HAS_DELTA:
            x = tl.load(X + rows64[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=row_ok[:, None] & (k[None, :] < R), other=0.0).to(tl.float32)
            x_hi, x_lo = split_tf32(x)
            v = tl.fma(dot_3xtf32(x_hi, x_lo, y_hi, y_lo), scale, v)
        if HAS_NOISE or STOCHASTIC:
            words = stream_words(seed, row_offset + rows64, col0, cols, N, ALIGNED8, HAS_NOISE,
                                 STOCHASTIC)
        else:
            words = 0  # not read: nearest rounding, no noise
        if HAS_NOISE and HAS_DELTA:
            v = tl.fma(centred_from_words(words), noise_scaled, v)
        elif HAS_NOISE:  # add_noise_: W + noise, two roundings as in the spec
            v = v + noise_from_words(words, noise_scaled)
        store_rounded(w_ptrs, v, mask, words, W_KIND, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must not become a constant
def merge_kernel(
    W, X, Y, FLAG, M, N,
    stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn,
    scale, noise_scaled, seed, row_offset, ROW_PROGRAMS, ITERS,
    R: tl.constexpr, R_PAD: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr,
    W_KIND: tl.constexpr, ALIGNED8: tl.constexpr, EVEN: tl.constexpr, HAS_FLAG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """With ``HAS_FLAG`` nothing is written when the int32 at ``FLAG`` is non-zero (the
    factors' non-finite check, ``finite.py``, queued before this launch)."""
    run = True
    if HAS_FLAG:
        run = tl.load(FLAG) == 0
    if run:
        merge_panel(W, X, Y, M, N, stride_wm, stride_wn, stride_xm, stride_xk, stride_yk,
                    stride_yn, scale, noise_scaled, seed, row_offset, tl.program_id(0),
                    tl.program_id(1), ROW_PROGRAMS, ITERS, R, R_PAD, HAS_DELTA, HAS_NOISE,
                    STOCHASTIC, W_KIND, ALIGNED8, EVEN, False, BLOCK_M, BLOCK_N, NUM_STAGES)
