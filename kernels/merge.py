"""Fused in-place merge: ``W += scale * X @ Y + noise * (U - 0.5)``, rounded to W's dtype.

One pass over W. Program (n, m) owns the BLOCK_N columns of column block n and walks
the row blocks m, m + ROW_PROGRAMS, ... (ITERS steps; steps past the last row block
are fully masked): Y's R x BLOCK_N panel is loaded once per program and kept for the
whole walk, and the loop is software-pipelined (``NUM_STAGES``) so the next W tile is
in flight while the current one is computed. Tiles are processed in tile order
(``merge_panel``): the product's rows and columns are permuted so that it lands in the
registers the coalesced W tile, the noise and the store use. Per tile: the rank-R product of X's rows
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
                     noise_from_words, split_tf32, store_rounded, tile_words)


@triton.jit
def _tile_index(BLOCK_M: tl.constexpr, NB: tl.constexpr, STEP: tl.constexpr):
    """Row and column, within a ``BLOCK_M x 32 NB`` tile, of the stacked tile
    ``[NB * BLOCK_M, 32 / STEP]`` (the tile's 32-column strips stacked): row ``t % BLOCK_M``,
    column ``32 (t // BLOCK_M) + STEP c`` at ``(t, c)``. ``STEP`` 1: every element;
    ``STEP`` 8: the first column of each run of eight (one Philox group). Shapes
    ``[NB * BLOCK_M, 1]`` and ``[NB * BLOCK_M, 32 / STEP]``."""
    t = tl.arange(0, NB * BLOCK_M)[:, None]
    return t % BLOCK_M, (t // BLOCK_M) * 32 + STEP * tl.arange(0, 32 // STEP)[None, :]


@triton.jit
def _product_rows(BLOCK_M: tl.constexpr):
    """The row that position ``i = 16 w + 8 g + l`` of the product holds:
    ``8 w + l + g * BLOCK_M / 2`` (warp ``w``'s 16 accumulator rows, split into the two
    halves of the tile)."""
    i = tl.arange(0, BLOCK_M)
    return (i // 16) * 8 + ((i // 8) % 2) * (BLOCK_M // 2) + i % 8


@triton.jit
def _product_columns(BLOCK_N: tl.constexpr):
    """The column that position ``p = 32 b + 8 j + 2 q + h`` of the product holds:
    ``32 b + 8 q + 2 j + h`` (an involution)."""
    p = tl.arange(0, BLOCK_N)
    return (p // 32) * 32 + ((p % 8) // 2) * 8 + ((p % 32) // 8) * 2 + p % 2


@triton.jit
def _to_tile_order(d, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    """The product (rows as ``_product_rows``, columns as ``_product_columns``) as the stacked
    tile of ``_tile_index``. The tensor-core accumulator gives each thread rows ``l`` and
    ``l + 8`` of its warp's 16 and column pairs ``8 j + 2 q``; after the two permutations
    these are eight consecutive columns of rows ``8 w + l`` and ``8 w + l + BLOCK_M / 2``:
    the layout a coalesced load of the stacked tile has (8 columns per thread, 4 threads
    per 32 columns, 8 rows per warp, warps stacked), so this relabels registers and moves
    no data."""
    d = tl.reshape(d, [BLOCK_M // 16, 2, 8, NB, 4, 4, 2])  # (w, g, l) x (b, j, q, h)
    d = tl.permute(d, [3, 1, 0, 2, 5, 4, 6])              # (b, g, w, l, q, j, h)
    return tl.reshape(d, [NB * BLOCK_M, 32])


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

    Tile order: the product is computed with X's rows and Y's columns permuted
    (``_product_rows``, ``_product_columns``) so that each thread's accumulator holds eight
    consecutive columns of W (``_to_tile_order``), and the W tile, the noise words (one
    Philox call per thread and eight elements) and the store all use the stacked tile of
    ``_tile_index``. Nothing passes through shared memory between the product and the store;
    in natural order the noise words and the rounded tile each took a layout conversion
    through shared memory (10 barriers per tile instead of the pipeline's 2; merge + noise
    at 8192^2 on the H200: 98 -> 79 us, bench/NOTES.md v9-v10). W's and X's pointers and the
    Philox groups are carried from step to step (one add each instead of the int64 index
    arithmetic per tile).

    ``W_ALIGNED16`` declares what a kernel argument's specialisation tells the compiler by
    itself: W's base and row stride (unit column stride) are 16-byte aligned, so its tiles
    move as 16-byte vectors through ``cp.async``. The grouped kernel reads W's address from
    a table and must declare it (without it: one 2-byte load and store per element)."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 32 == 0, "tile order: 16-row, 32-column units")
    NB: tl.constexpr = BLOCK_N // 32
    col0 = pid_n * BLOCK_N
    t_row, t_col = _tile_index(BLOCK_M, NB, 1)
    cols = col0 + t_col
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    k = tl.arange(0, R_PAD)
    if HAS_DELTA:
        y_cols = (col0 + _product_columns(BLOCK_N)).to(tl.int64)
        y_hi, y_lo = split_tf32(tl.load(Y + k[:, None] * stride_yk + y_cols[None, :] * stride_yn,
                                        mask=(k[:, None] < R) & (y_cols[None, :] < N),
                                        other=0.0).to(tl.float32))
    # W's pointers, X's pointers and the Philox groups advance by a fixed step per walk step
    row_step = tl.full((), BLOCK_M, tl.int64) * ROW_PROGRAMS  # ROW_PROGRAMS may be a constant 1
    row0 = pid_m * BLOCK_M
    w_ptrs = W + (row0 + t_row).to(tl.int64) * stride_wm + cols64 * stride_wn
    if W_ALIGNED16:
        w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
    x_rows = _product_rows(BLOCK_M)
    x_ptrs = X + (row0 + x_rows).to(tl.int64)[:, None] * stride_xm + k[None, :] * stride_xk
    _, g_col = _tile_index(BLOCK_M, NB, 8)
    g = ((row_offset + row0 + t_row).to(tl.int64) * N + (col0 + g_col)) // 8
    for i in tl.range(0, ITERS, num_stages=NUM_STAGES):
        row0 = (pid_m + i * ROW_PROGRAMS) * BLOCK_M
        if EVEN:
            mask = None
            v = load_f32_unmasked(w_ptrs, W_KIND)
        else:
            mask = (row0 + t_row < M) & col_ok
            v = load_f32(w_ptrs, mask, W_KIND)
        if HAS_DELTA:
            x_ok = k[None, :] < R  # all true (no predicate) when R == R_PAD is a constant
            if not EVEN:
                x_ok = x_ok & (row0 + x_rows < M)[:, None]
            x_hi, x_lo = split_tf32(tl.load(x_ptrs, mask=x_ok, other=0.0).to(tl.float32))
            d = _to_tile_order(dot_3xtf32(x_hi, x_lo, y_hi, y_lo), BLOCK_M, NB)
            v = tl.fma(d, scale, v)
        if HAS_NOISE or STOCHASTIC:
            e = (row_offset + row0 + t_row).to(tl.int64) * N + cols64  # read unless ALIGNED8
            words = tile_words(seed, g, e, ALIGNED8, HAS_NOISE, STOCHASTIC)
        else:
            words = 0  # not read: nearest rounding, no noise
        if HAS_NOISE and HAS_DELTA:
            v = tl.fma(centred_from_words(words, not STOCHASTIC), noise_scaled, v)
        elif HAS_NOISE:  # add_noise_: W + noise, two roundings as in the spec
            v = v + noise_from_words(words, noise_scaled, not STOCHASTIC)
        store_rounded(w_ptrs, v, mask, words, W_KIND, STOCHASTIC)
        w_ptrs += row_step * stride_wm
        x_ptrs += row_step * stride_xm
        g += row_step * N // 8  # whole groups when ALIGNED8 (N % 8 == 0), else not read


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
