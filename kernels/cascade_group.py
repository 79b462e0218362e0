"""A whole-model cascade boundary in a few launches: grouped moments and grouped merges.

Layers of one group (same storage kinds and padded rank) share one launch: an int64 table
holds each layer's addresses, sizes, strides and launch geometry, and OFFSETS the first
program of each layer (padded with int32 max), so program ``pid`` finds its layer by
counting the offsets at or below it. The bodies are the single-layer ones
(``moments.gram_part``, ``moments.moments_from_parts``, ``merge.merge_panel``).

Failure without a host round trip: ``moments_group_kernel`` raises an int32 flag (atomic
max) when any layer's std is not finite, and every merge (and the EMA) program reads the
flag first and writes nothing if it is set; the host checks the flag once, at the end.

Per-boundary values live in device memory (the seeds, one int64 per layer), so a plan's
tables are built once and reused by every boundary (``lorasc_fast.group_plan``).

Extra memory: the tables (a few hundred bytes per layer) and the moments' workspace.
"""
import triton
import triton.language as tl

from .common import as_pointer
from .merge import merge_panel
from .moments import gram_part, moments_from_parts

# int64 fields per layer, in table order
GRAM_FIELDS = ("A_s", "A_f", "B_s", "B_f", "R", "IN", "OUT",
               "stride_ak", "stride_aj", "stride_afk", "stride_afj",
               "stride_bi", "stride_bk", "stride_bfi", "stride_bfk",
               "split_a", "split_b", "chunk_a", "chunk_b", "ws_offset", "std_index")
MERGE_FIELDS = ("W", "X", "Y", "M", "N", "stride_wm", "stride_wn", "stride_xm", "stride_xk",
                "stride_yk", "stride_yn", "R", "row_offset", "col_blocks", "row_programs",
                "iters", "std_index")


@triton.jit
def _find_layer(OFFSETS, pid, L_PAD: tl.constexpr):
    first = tl.load(OFFSETS + tl.arange(0, L_PAD))
    layer = tl.sum((first <= pid).to(tl.int32), axis=0) - 1
    return layer, pid - tl.load(OFFSETS + layer)


@triton.jit
def gram_group_kernel(
    LAYERS, OFFSETS, WS, alpha,
    NF: tl.constexpr, L_PAD: tl.constexpr,
    A_KIND: tl.constexpr, AF_KIND: tl.constexpr, B_KIND: tl.constexpr, BF_KIND: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    layer, part = _find_layer(OFFSETS, tl.program_id(0), L_PAD)
    f = LAYERS + layer * NF
    gram_part(as_pointer(tl.load(f + 0), A_KIND), as_pointer(tl.load(f + 1), AF_KIND),
              as_pointer(tl.load(f + 2), B_KIND), as_pointer(tl.load(f + 3), BF_KIND),
              WS + tl.load(f + 19), tl.load(f + 4), tl.load(f + 5), tl.load(f + 6),
              tl.load(f + 7), tl.load(f + 8), tl.load(f + 9), tl.load(f + 10),
              tl.load(f + 11), tl.load(f + 12), tl.load(f + 13), tl.load(f + 14),
              alpha, part, tl.load(f + 15), tl.load(f + 17), tl.load(f + 18),
              True, A_KIND, AF_KIND, B_KIND, BF_KIND, R_PAD, BLOCK)


@triton.jit
def moments_group_kernel(LAYERS, SCALES, WS, STD, FLAG, NF: tl.constexpr, R_PAD: tl.constexpr,
                         VALUES: tl.constexpr):
    layer = tl.program_id(0)
    f = LAYERS + layer * NF
    _, std = moments_from_parts(WS + tl.load(f + 19), tl.load(f + 15), tl.load(f + 16),
                                tl.load(f + 5) * tl.load(f + 6), tl.load(SCALES + layer), R_PAD,
                                VALUES)
    tl.store(STD + tl.load(f + 20), std.to(tl.float32))
    tl.atomic_max(FLAG, ((std - std) != 0.0).to(tl.int32))  # NaN or Inf


@triton.jit
def merge_group_kernel(
    LAYERS, OFFSETS, SCALES, STD, SEEDS, FLAG, noise_lambda_scaled,
    NF: tl.constexpr, L_PAD: tl.constexpr, R_PAD: tl.constexpr,
    HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr, W_KIND: tl.constexpr,
    X_KIND: tl.constexpr, Y_KIND: tl.constexpr, ALIGNED8: tl.constexpr,
    FAN_IN_FAN_OUT: tl.constexpr, ALIGNED16: tl.constexpr, EVEN: tl.constexpr,
    FULL_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Rows of W and the slow factors are contiguous (the plan checks): the unit strides are
    compile-time constants, and with ``ALIGNED16`` the row strides and base addresses are
    declared multiples of 16, so tiles load and store as wide vectors. ``FULL_RANK``: every
    layer's rank is ``R_PAD``, so X's rows load unmasked. Sizes fit int32 (the plan checks)."""
    layer, local = _find_layer(OFFSETS, tl.program_id(0), L_PAD)
    if tl.load(FLAG) == 0:
        f = LAYERS + layer * NF
        col_blocks = tl.load(f + 13)
        std_index = tl.load(f + 16)
        noise_scaled = noise_lambda_scaled * tl.load(STD + std_index)
        w_addr = tl.load(f + 0)
        y_addr = tl.load(f + 2)
        stride_wm = tl.load(f + 5)
        if ALIGNED16:
            w_addr = tl.multiple_of(w_addr, 16)
            y_addr = tl.multiple_of(y_addr, 16)
            stride_wm = tl.multiple_of(stride_wm, 16)
        W = as_pointer(w_addr, W_KIND)
        Y = as_pointer(y_addr, Y_KIND)
        if FAN_IN_FAN_OUT:  # X = A^T (stride_xm = 1), Y = B^T (stride_yk = 1)
            stride_xm, stride_xk = 1, tl.load(f + 8)
            stride_yk, stride_yn = 1, tl.load(f + 10)
        else:  # X = B (stride_xk = 1), Y = A (stride_yn = 1)
            stride_xm, stride_xk = tl.load(f + 7), 1
            stride_yk, stride_yn = tl.load(f + 9), 1
            if ALIGNED16:
                stride_yk = tl.multiple_of(stride_yk, 16)
        R = R_PAD if FULL_RANK else tl.load(f + 11)  # a constant: no mask on X's columns
        merge_panel(W, as_pointer(tl.load(f + 1), X_KIND), Y, tl.load(f + 3).to(tl.int32),
                    tl.load(f + 4).to(tl.int32),
                    stride_wm, 1, stride_xm, stride_xk, stride_yk, stride_yn,
                    tl.load(SCALES + layer), noise_scaled,
                    tl.load(SEEDS + std_index), tl.load(f + 12), local % col_blocks,
                    local // col_blocks, tl.load(f + 14), tl.load(f + 15), R,
                    R_PAD, True, HAS_NOISE, STOCHASTIC, W_KIND, ALIGNED8, EVEN, ALIGNED16,
                    BLOCK_M, BLOCK_N, NUM_STAGES)
