"""The random stream itself: writes the 32-bit word of every element of a logical matrix.

Used to check the stream (GPU vs interpreter vs ``lorasc_fast.stream``) and by users who
want the exact noise the fused ops add. Bytes written: 4 per element.
"""
import triton
import triton.language as tl

from .common import stream_words


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must not become a constant
def stream_kernel(OUT, M, N, seed, row_offset, ALIGNED8: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    words = stream_words(seed, (row_offset + rows).to(tl.int64), col0, cols, N, ALIGNED8,
                         True, True)
    tl.store(OUT + rows[:, None].to(tl.int64) * N + cols[None, :], words.to(tl.int32, bitcast=True),
             mask=mask)
