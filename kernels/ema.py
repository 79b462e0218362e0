"""Multi-tensor EMA in one launch: ``slow = alpha * slow + (1 - alpha) * fast`` for many pairs.

The caller passes tables of the tensors' addresses (int64) and a block table mapping
each program to (tensor index, first element), so any number of factor pairs of one
(slow dtype, fast dtype) combination is updated by a single launch. Math in fp32,
rounded to nearest-even into slow's dtype (bf16 handled as int16 bits).

Bytes moved: read slow and fast, write slow, once. Extra memory: the small tables.
"""
import triton
import triton.language as tl

from .common import load_f32, store_rounded


@triton.jit
def _as_ptr(addr, KIND: tl.constexpr):
    if KIND == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        return addr.to(tl.pointer_type(tl.float16))
    else:
        return addr.to(tl.pointer_type(tl.int16))


@triton.jit
def ema_kernel(SLOW_ADDRS, FAST_ADDRS, NUMELS, BLOCK_TENSOR, BLOCK_START, alpha,
               S_KIND: tl.constexpr, F_KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    start = tl.load(BLOCK_START + pid)
    n = tl.load(NUMELS + t)
    s_ptr = _as_ptr(tl.load(SLOW_ADDRS + t), S_KIND)
    f_ptr = _as_ptr(tl.load(FAST_ADDRS + t), F_KIND)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    s = load_f32(s_ptr + offs, mask, S_KIND)
    f = load_f32(f_ptr + offs, mask, F_KIND)
    store_rounded(s_ptr + offs, alpha * s + (1.0 - alpha) * f, mask, 0, S_KIND, False)
