"""Mean and std of ``scale * B @ A`` from r x r Gram matrices, never forming B @ A.

With ``M = s B A`` (B: out x r, A: r x in, N = out * in elements):
``sum(M) = s * sum_k (1^T B)_k (A 1)_k`` and ``||M||_F^2 = s^2 * sum((B^T B) * (A A^T))``.

``moments_kernel``, one launch: program p reduces a chunk of A's columns (first SPLIT_A
programs) or of B's rows (the rest) into a partial Gram (R_PAD x R_PAD) and a partial
sum vector (R_PAD), written to a small fp32 workspace (``gram_part``). The Gram products
run on the tensor cores in 3xTF32 (each product accurate to ~2**-22 relative, accumulated
in fp32). With ``EMA`` the factors are taken as ``alpha * slow + (1 - alpha) * fast`` on
the fly (nothing is written). Each program then counts its arrival on an int32 counter
(an acquire-release atomic after a barrier, so its stores are visible to whoever counts
after it); the last to arrive adds the partials in fp64 in a fixed order (the result does
not depend on which program is last), writes ``[mean, std]`` (unbiased std) as fp32 and
resets the counter to zero for the next launch on the stream.

Bytes read: the factors once (twice with EMA). Extra memory: the workspace,
(SPLIT_A + SPLIT_B) * (R_PAD**2 + R_PAD) * 4 bytes, capped by the caller, and the counter.
"""
import triton
import triton.language as tl

from .common import load_f32


@triton.jit
def _factor_tile(S, F, s_offs, f_offs, mask, alpha, EMA: tl.constexpr,
                 S_KIND: tl.constexpr, F_KIND: tl.constexpr):
    """A factor tile in fp32; with ``EMA``, ``alpha * slow + (1 - alpha) * fast``."""
    t = load_f32(S + s_offs, mask, S_KIND)
    if EMA:
        t = alpha * t + (1.0 - alpha) * load_f32(F + f_offs, mask, F_KIND)
    return t


@triton.jit
def gram_part(
    A_s, A_f, B_s, B_f, WS, R, IN, OUT,
    stride_ak, stride_aj, stride_afk, stride_afj,
    stride_bi, stride_bk, stride_bfi, stride_bfk,
    alpha, part, SPLIT_A, CHUNK_A, CHUNK_B,
    EMA: tl.constexpr, A_KIND: tl.constexpr, AF_KIND: tl.constexpr,
    B_KIND: tl.constexpr, BF_KIND: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Partial Gram and sums of chunk ``part`` (of A's columns, then of B's rows) into WS."""
    k = tl.arange(0, R_PAD)
    k_ok = k < R
    gram = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    sums = tl.zeros((R_PAD,), dtype=tl.float32)
    if part < SPLIT_A:
        start = part * CHUNK_A
        stop = tl.minimum(start + CHUNK_A, IN)
        for j0 in range(start, stop, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            mask = (j[:, None] < stop) & k_ok[None, :]
            jj = j[:, None].to(tl.int64)
            # tile of A^T: BLOCK x R_PAD
            t = _factor_tile(A_s, A_f, jj * stride_aj + k[None, :] * stride_ak,
                             jj * stride_afj + k[None, :] * stride_afk, mask, alpha,
                             EMA, A_KIND, AF_KIND)
            gram += tl.dot(tl.trans(t), t, input_precision="tf32x3")
            sums += tl.sum(t, axis=0)
    else:
        start = (part - SPLIT_A) * CHUNK_B
        stop = tl.minimum(start + CHUNK_B, OUT)
        for i0 in range(start, stop, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            mask = (i[:, None] < stop) & k_ok[None, :]
            ii = i[:, None].to(tl.int64)
            t = _factor_tile(B_s, B_f, ii * stride_bi + k[None, :] * stride_bk,
                             ii * stride_bfi + k[None, :] * stride_bfk, mask, alpha,
                             EMA, B_KIND, BF_KIND)
            gram += tl.dot(tl.trans(t), t, input_precision="tf32x3")
            sums += tl.sum(t, axis=0)
    base = WS + part * (R_PAD * R_PAD + R_PAD)
    tl.store(base + k[:, None] * R_PAD + k[None, :], gram)
    tl.store(base + R_PAD * R_PAD + k, sums)


@triton.jit
def _sum_parts(WS, SPLIT_A, SPLIT_B, R_PAD: tl.constexpr, VALUES: tl.constexpr):
    """fp64 sums of A's partials (``0 .. SPLIT_A - 1``) and of B's (the next ``SPLIT_B``):
    the flattened Grams and the sum vectors.

    Each step loads ``PB`` partials of both factors as two [PB, R_PAD**2] tiles (about
    ``VALUES`` values each), so the loop takes ``max(SPLIT_A, SPLIT_B) / PB`` dependent
    steps (one at 8192 x 8192, r = 16)."""
    PB: tl.constexpr = (VALUES + R_PAD * R_PAD - 1) // (R_PAD * R_PAD)
    STRIDE: tl.constexpr = R_PAD * R_PAD + R_PAD
    e = tl.arange(0, R_PAD * R_PAD)
    k = tl.arange(0, R_PAD)
    ga = tl.zeros((R_PAD * R_PAD,), dtype=tl.float64)
    gb = tl.zeros((R_PAD * R_PAD,), dtype=tl.float64)
    sa = tl.zeros((R_PAD,), dtype=tl.float64)
    sb = tl.zeros((R_PAD,), dtype=tl.float64)
    for p0 in range(0, tl.maximum(SPLIT_A, SPLIT_B), PB):
        p = p0 + tl.arange(0, PB)
        a_ok = (p < SPLIT_A)[:, None]
        b_ok = (p < SPLIT_B)[:, None]
        a = WS + p.to(tl.int64)[:, None] * STRIDE
        b = a + SPLIT_A * STRIDE
        ga += tl.sum(tl.load(a + e[None, :], mask=a_ok, other=0.0).to(tl.float64), axis=0)
        gb += tl.sum(tl.load(b + e[None, :], mask=b_ok, other=0.0).to(tl.float64), axis=0)
        sa += tl.sum(tl.load(a + R_PAD * R_PAD + k[None, :], mask=a_ok,
                             other=0.0).to(tl.float64), axis=0)
        sb += tl.sum(tl.load(b + R_PAD * R_PAD + k[None, :], mask=b_ok,
                             other=0.0).to(tl.float64), axis=0)
    return ga, sa, gb, sb


@triton.jit
def moments_from_parts(WS, SPLIT_A, SPLIT_B, numel, scale, R_PAD: tl.constexpr,
                       VALUES: tl.constexpr):
    """``(mean, std)`` in fp64 from the partial Grams and sums (NaN and Inf propagate)."""
    ga, sa, gb, sb = _sum_parts(WS, SPLIT_A, SPLIT_B, R_PAD, VALUES)
    s = tl.cast(scale, tl.float64)
    n = tl.cast(numel, tl.float64)
    total = tl.sum(sa * sb, axis=0) * s
    sumsq = tl.sum(ga * gb, axis=0) * s * s
    mean = total / n
    var = sumsq - total * mean
    var = tl.where(var != var, var, tl.maximum(var, 0.0)) / tl.maximum(n - 1.0, 1.0)  # keep NaN
    return mean, tl.sqrt(var)


@triton.jit
def moments_kernel(
    A_s, A_f, B_s, B_f, WS, COUNT, OUT_PTR, R, IN, OUT,
    stride_ak, stride_aj, stride_afk, stride_afj,
    stride_bi, stride_bk, stride_bfi, stride_bfk,
    alpha, SPLIT_A, SPLIT_B, CHUNK_A, CHUNK_B, numel, scale,
    EMA: tl.constexpr, A_KIND: tl.constexpr, AF_KIND: tl.constexpr,
    B_KIND: tl.constexpr, BF_KIND: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr, VALUES: tl.constexpr,
):
    """The partials, then, in the last program to finish (``COUNT`` arrivals, reset to
    zero by that program), ``[mean, std]`` into ``OUT_PTR``."""
    gram_part(A_s, A_f, B_s, B_f, WS, R, IN, OUT, stride_ak, stride_aj, stride_afk, stride_afj,
              stride_bi, stride_bk, stride_bfi, stride_bfk, alpha, tl.program_id(0), SPLIT_A,
              CHUNK_A, CHUNK_B, EMA, A_KIND, AF_KIND, B_KIND, BF_KIND, R_PAD, BLOCK)
    tl.debug_barrier()  # every thread's partial is stored before the count is released
    arrived = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_A + SPLIT_B - 1:
        mean, std = moments_from_parts(WS, SPLIT_A, SPLIT_B, numel, scale, R_PAD, VALUES)
        tl.store(OUT_PTR, mean.to(tl.float32))
        tl.store(OUT_PTR + 1, std.to(tl.float32))
        tl.store(COUNT, 0)
