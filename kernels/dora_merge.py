"""Fused DoRA merge: ``W <- post * (W / div + scale * B @ A + noise * (U - 0.5))`` per output
feature.

The kernel sees W logically as ``out x in`` (output features are rows, M x N); a stored
``in x out`` weight (``fan_in_fan_out``) is passed with swapped strides and ``TRANSPOSED``,
so the delta is always ``B @ A`` while the noise and rounding words still come from the
stored element ``(row_offset + stored_row) * stored_cols + stored_col``.

Each program owns BLOCK_M output features and walks all N input features:

* pass 1 (``POST == 2`` or ``WRITE_NORM``): ``ss = sum_j V_ij^2`` in fp32, regenerating
  the noise words; ``WRITE_NORM`` stores ``sqrt(ss)``;
* pass 2 (``WRITE_W``): recompute V and store ``post * V`` rounded to W's dtype
  (nearest-even or stochastic, with the same words as the noise).

``noise_scaled`` is ``noise / 2**16`` (``kernels.common.noise_from_words``).
``post``: 0 none (1), 1 a loaded fp32 vector, 2 ``magnitude / sqrt(ss)`` (DoRA).
``HAS_DIV`` divides W's rows by a loaded fp32 vector first (PEFT's DoRA unmerge,
``W / dora_factor - delta``). Square root and divisions are correctly rounded, so the
torch path reproduces them exactly.

Bytes moved: W read once per pass and written once; factors re-read from cache.
Extra memory: none (the norm vector when asked for).
"""
import triton
import triton.language as tl

from .common import dot_3xtf32, load_f32, noise_from_words, split_tf32, store_rounded, stream_words


@triton.jit
def _v_tile(W, X, Y, m0, rows, row_ok, div, x_hi, x_lo, n0, M, N,
            stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn,
            scale, noise_scaled, seed, row_offset,
            R: tl.constexpr, R_PAD: tl.constexpr, HAS_DIV: tl.constexpr,
            HAS_NOISE: tl.constexpr, ROUNDING: tl.constexpr, TRANSPOSED: tl.constexpr,
            ALIGNED8: tl.constexpr, W_KIND: tl.constexpr, X_KIND: tl.constexpr,
            Y_KIND: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of V (fp32, zero outside W), its words and pointers."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_wm + cols[None, :].to(tl.int64) * stride_wn
    v = load_f32(w_ptrs, mask, W_KIND)
    if HAS_DIV:
        v = tl.div_rn(v, div[:, None])
    if USE_DOT:
        k = tl.arange(0, R_PAD)
        y_hi, y_lo = split_tf32(load_f32(
            Y + k[:, None] * stride_yk + cols[None, :].to(tl.int64) * stride_yn,
            (k[:, None] < R) & col_ok[None, :], Y_KIND))
        d = dot_3xtf32(x_hi, x_lo, y_hi, y_lo)
    else:
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in tl.static_range(R):
            xk = load_f32(X + rows.to(tl.int64) * stride_xm + kk * stride_xk, row_ok, X_KIND)
            yk = load_f32(Y + kk * stride_yk + cols.to(tl.int64) * stride_yn, col_ok, Y_KIND)
            d += xk[:, None] * yk[None, :]
    v = v + d * scale
    if HAS_NOISE or ROUNDING:
        if TRANSPOSED:
            # stored element (logical col j, logical row i): stored rows are the logical columns
            srows = (row_offset + cols).to(tl.int64)
            words = tl.trans(stream_words(seed, srows, m0, rows, M, ALIGNED8, HAS_NOISE,
                                          ROUNDING))
        else:
            srows = (row_offset + rows).to(tl.int64)
            words = stream_words(seed, srows, n0, cols, N, ALIGNED8, HAS_NOISE, ROUNDING)
    else:
        words = 0  # not read: nearest rounding, no noise
    if HAS_NOISE:
        v = v + noise_from_words(words, noise_scaled, not ROUNDING)
    v = tl.where(mask, v, 0.0)
    return v, words, w_ptrs, mask


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must not become a constant
def dora_kernel(
    W, X, Y, MAG, DIV, POST_VEC, NORM_OUT, M, N,
    stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn, stride_mag,
    scale, noise_scaled, seed, row_offset,
    R: tl.constexpr, R_PAD: tl.constexpr, POST: tl.constexpr, HAS_DIV: tl.constexpr,
    WRITE_NORM: tl.constexpr, WRITE_W: tl.constexpr, HAS_NOISE: tl.constexpr,
    STOCHASTIC: tl.constexpr, TRANSPOSED: tl.constexpr, ALIGNED8: tl.constexpr,
    W_KIND: tl.constexpr, X_KIND: tl.constexpr, Y_KIND: tl.constexpr, MAG_KIND: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if HAS_DIV:
        div = tl.load(DIV + rows, mask=row_ok, other=1.0)
    else:
        div = 1.0
    if USE_DOT:
        k = tl.arange(0, R_PAD)
        x_hi, x_lo = split_tf32(load_f32(
            X + rows[:, None].to(tl.int64) * stride_xm + k[None, :] * stride_xk,
            row_ok[:, None] & (k[None, :] < R), X_KIND))
    else:
        x_hi = 0.0
        x_lo = 0.0
    post = tl.full((BLOCK_M,), 1.0, tl.float32)
    if POST == 1:
        post = tl.load(POST_VEC + rows, mask=row_ok, other=1.0)

    if POST == 2 or WRITE_NORM:
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            v, words, w_ptrs, mask = _v_tile(
                W, X, Y, m0, rows, row_ok, div, x_hi, x_lo, n0, M, N,
                stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn,
                scale, noise_scaled, seed, row_offset, R, R_PAD, HAS_DIV, HAS_NOISE, False,
                TRANSPOSED, ALIGNED8, W_KIND, X_KIND, Y_KIND, USE_DOT, BLOCK_M, BLOCK_N)
            ss += tl.sum(v * v, axis=1)
        norm = tl.sqrt_rn(ss)
        if WRITE_NORM:
            tl.store(NORM_OUT + rows, norm, mask=row_ok)
        if POST == 2:
            mag = load_f32(MAG + rows.to(tl.int64) * stride_mag, row_ok, MAG_KIND)
            post = tl.div_rn(mag, tl.where(row_ok, norm, 1.0))

    if WRITE_W:
        for n0 in range(0, N, BLOCK_N):
            v, words, w_ptrs, mask = _v_tile(
                W, X, Y, m0, rows, row_ok, div, x_hi, x_lo, n0, M, N,
                stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn,
                scale, noise_scaled, seed, row_offset, R, R_PAD, HAS_DIV, HAS_NOISE,
                STOCHASTIC, TRANSPOSED, ALIGNED8, W_KIND, X_KIND, Y_KIND, USE_DOT,
                BLOCK_M, BLOCK_N)
            if POST != 0:
                v = v * post[:, None]
            store_rounded(w_ptrs, v, mask, words, W_KIND, STOCHASTIC)
