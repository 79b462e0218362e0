"""Multi-tensor EMA in one launch: ``slow = alpha * slow + (1 - alpha) * fast`` for many pairs.

The caller passes tables of the tensors' addresses (int64) and a block table mapping
each program to (tensor index, first element), so any number of factor pairs of one
(slow dtype, fast dtype) combination is updated by a single launch. Math in fp32,
rounded to nearest-even into slow's dtype (storage kinds as in ``common``).

``CHECK`` is the op's non-finite pre-pass over the fast tensors: it writes nothing but the
flag at ``SKIP`` (set to 1 on NaN or Inf), which the write pass queued after it reads, so
a rejected call writes nothing and the host syncs once, after both.

Bytes moved: read slow and fast, write slow, once (the check pass reads fast once more).
Extra memory: the small tables.
"""
import triton
import triton.language as tl

from .common import as_pointer, flag_nonfinite, load_f32, store_rounded


@triton.jit
def ema_kernel(SLOW_ADDRS, FAST_ADDRS, NUMELS, BLOCK_TENSOR, BLOCK_START, SKIP, alpha,
               S_KIND: tl.constexpr, F_KIND: tl.constexpr, CHECK: tl.constexpr,
               BLOCK: tl.constexpr):
    """``SKIP`` points to an int32 flag: non-zero means write nothing (a failed check)."""
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    start = tl.load(BLOCK_START + pid)
    n = tl.load(NUMELS + t)
    s_ptr = as_pointer(tl.load(SLOW_ADDRS + t), S_KIND)
    f_ptr = as_pointer(tl.load(FAST_ADDRS + t), F_KIND)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    if CHECK:
        flag_nonfinite(load_f32(f_ptr + offs, offs < n, F_KIND), SKIP)
    else:
        mask = (offs < n) & (tl.load(SKIP) == 0)
        s = load_f32(s_ptr + offs, mask, S_KIND)
        f = load_f32(f_ptr + offs, mask, F_KIND)
        store_rounded(s_ptr + offs, alpha * s + (1.0 - alpha) * f, mask, 0, S_KIND, False)
