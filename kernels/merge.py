"""Fused in-place merge: ``W += scale * X @ Y + noise * (U - 0.5)``, rounded to W's dtype.

One pass over W: each program loads a BLOCK_M x BLOCK_N tile of W once, forms the
rank-R product of the matching rows of X (M x R) and columns of Y (R x N) in fp32,
adds the noise drawn from the library's Philox stream, rounds (nearest-even or
stochastic) and stores the tile back. X and Y are B and A (or A^T and B^T for
``fan_in_fan_out``), given by strides, so no transposed copy is made.

Bytes moved: 2 * W.nbytes + the factors (re-read from cache per tile). Extra memory: none.
Small ranks use exact fp32 FMAs (R multiply-adds per element); larger ranks use
``tl.dot`` with K padded to R_PAD >= 16 in 3xTF32 (fp32-accurate) precision.
``HAS_DELTA=False`` gives the noise-only op ``add_noise_``.
"""
import triton
import triton.language as tl

from .common import load_f32, noise_from_words, store_rounded, stream_words


@triton.jit
def merge_kernel(
    W, X, Y, M, N,
    stride_wm, stride_wn, stride_xm, stride_xk, stride_yk, stride_yn,
    scale, noise, seed, row_offset,
    R: tl.constexpr, R_PAD: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr,
    W_KIND: tl.constexpr, ALIGNED4: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_wm + cols[None, :].to(tl.int64) * stride_wn
    v = load_f32(w_ptrs, mask, W_KIND)

    if HAS_DELTA:
        if USE_DOT:
            k = tl.arange(0, R_PAD)
            x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + k[None, :] * stride_xk,
                        mask=row_ok[:, None] & (k[None, :] < R), other=0.0).to(tl.float32)
            y = tl.load(Y + k[:, None] * stride_yk + cols[None, :].to(tl.int64) * stride_yn,
                        mask=(k[:, None] < R) & col_ok[None, :], other=0.0).to(tl.float32)
            d = tl.dot(x, y, input_precision="tf32x3")
        else:
            d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in tl.static_range(R):
                xk = tl.load(X + rows.to(tl.int64) * stride_xm + kk * stride_xk, mask=row_ok, other=0.0)
                yk = tl.load(Y + kk * stride_yk + cols.to(tl.int64) * stride_yn, mask=col_ok, other=0.0)
                d += xk.to(tl.float32)[:, None] * yk.to(tl.float32)[None, :]
        v = v + d * scale

    if HAS_NOISE or STOCHASTIC:
        grows = (row_offset + rows).to(tl.int64)
        words = stream_words(seed, grows, col0, cols, N, ALIGNED4)
    else:
        words = 0  # not read: nearest rounding, no noise
    if HAS_NOISE:
        v = v + noise_from_words(words, noise)
    store_rounded(w_ptrs, v, mask, words, W_KIND, STOCHASTIC)
