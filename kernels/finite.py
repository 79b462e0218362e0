"""Non-finite check of up to four tensors in one launch: ``FLAG <- 1`` if any element is NaN
or Inf; the flag is only ever set, so it is zeroed by the caller.

``merge_`` runs it before its write pass and hands ``FLAG`` to that pass, which writes
nothing when it is set (``ema_`` checks in its own kernel, ``ema.py``'s ``CHECK`` pass);
the host reads the flag once, after both are queued, instead of syncing between them.
Program ``(i, t)`` reads block ``i`` of tensor ``t`` (contiguous, storage kinds as in
``common``). Bytes: each tensor read once. Extra memory: none.
"""
import triton
import triton.language as tl

from .common import flag_nonfinite, load_f32


@triton.jit
def _check_block(T, N, pid, FLAG, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    flag_nonfinite(load_f32(T + offs, offs < N, KIND), FLAG)


@triton.jit
def nonfinite_kernel(T0, N0, T1, N1, T2, N2, T3, N3, FLAG,
                     K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                     NUM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    if t == 0:
        _check_block(T0, N0, pid, FLAG, K0, BLOCK)
    if NUM > 1:
        if t == 1:
            _check_block(T1, N1, pid, FLAG, K1, BLOCK)
    if NUM > 2:
        if t == 2:
            _check_block(T2, N2, pid, FLAG, K2, BLOCK)
    if NUM > 3:
        if t == 3:
            _check_block(T3, N3, pid, FLAG, K3, BLOCK)
