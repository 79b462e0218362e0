"""Launching the Triton kernels: storage kinds, tile shapes, workspaces.

On CUDA tensors the kernels compile for the GPU. On CPU tensors they run under Triton's
interpreter, which must be switched on (``TRITON_INTERPRET=1``) before the kernels are
first imported; that is how the CPU test suite runs them.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# bf16: int16 bits and integer rounding in the interpreter, the hardware conversion on the
# GPU (kernels/common.py); both round to nearest even.
STORAGE_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2 if INTERPRETED else 3}


def _kernels():
    from .kernels import ema, merge, moments, stream  # noqa: F401  (import on first use)
    return merge, moments, ema, stream


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """An int32 device flag, non-zero once the queued checks find NaN or Inf in any tensor.

    No host sync: the flag is read by the write pass queued after it (``launch_merge``'s
    ``flag``) and by the caller once at the end. Up to four contiguous tensors go through one
    launch of ``kernels/finite.py``; others (rare: strided factors) through torch reductions.
    """
    from .kernels import finite
    tensors = [t for t in tensors if t.numel()]
    device = tensors[0].device if tensors else torch.device("cpu")
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    dense = [t for t in tensors if t.is_contiguous()][:4]
    for t in tensors:
        if not any(t is d for d in dense):
            flag.bitwise_or_(torch.isfinite(t).all().logical_not().to(torch.int32))
    if dense:
        block = 4096 if device.type == "cuda" else 1 << 14
        args, kinds = [], {}
        for i in range(4):
            t = dense[i] if i < len(dense) else dense[0]
            args += [storage(t), t.numel() if i < len(dense) else 0]
            kinds[f"K{i}"] = STORAGE_KIND[t.dtype]
        programs = -(-max(t.numel() for t in dense) // block)
        finite.nonfinite_kernel[(programs, len(dense))](*args, flag, NUM=len(dense), BLOCK=block,
                                                        **kinds)
    return flag


def check_available(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing lorasc_fast (or use backend='torch')")
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a Linux dependency
        raise RuntimeError("backend='triton' needs the triton package") from e


def storage(t: torch.Tensor) -> torch.Tensor:
    """What the kernels see: bf16 as its int16 bit pattern in the interpreter, else ``t``."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 and INTERPRETED else t


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def merge_config(M: int, N: int, R: int, device: torch.device, w_bytes: int = 2,
                 noise: bool = True) -> dict:
    """Tile shape, warps, pipelining depth, register cap and programs per SM for one merge
    launch on a W of ``w_bytes`` per element, with or without ``noise``.

    The interpreter costs ~12 ms per program, so it gets large tiles and few programs;
    on the GPU the values come from bench/sweep_merge.py on the H200 (bench/NOTES.md).
    ``maxnreg`` holds for the unmasked, eight-aligned variants only (``launch_merge``).
    """
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_N=128, programs_per_sm=8)
    if R <= 32 and w_bytes == 4:
        # fp32 W (round 15, h200_sweep15_fp32_*.json): with noise 64 x 64 tiles, 4 warps,
        # 2 programs per SM, no register cap: 142.8 us at 8192^2 (89 %) against 154.0 us for
        # round 13's 128 x 64, 8 warps, 1 per SM (64 x 64 capped at 128 registers spills);
        # the merge alone keeps the latter (142.4 against 145.4 us)
        if noise:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, NUM_STAGES=3, programs_per_sm=2)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, NUM_STAGES=3, programs_per_sm=1)
    if R <= 32:
        # round 12 (bench/results/tuning/h200_sweep12*.json): in tile order 64 x 64 tiles at
        # 4 programs per SM (16 warps; 125 registers uncapped on Triton 3.6, 148 on 3.7.1:
        # the cap keeps 4 resident there) ran merge + noise in 83 us at 8192^2 against 88 us for
        # 64 x 128 at 2 per SM; merge alone 79 against 76.5 us (one config for all modes)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, NUM_STAGES=3, maxnreg=128,
                    programs_per_sm=4)
    # r > 32: the product's 3xTF32 work grows with r; 64 x 64 tiles (round 7: r = 64 merge
    # 180 -> 129 us, + noise 271 -> 217 us against 16 x 128) keep the A panel small. Two
    # programs fit per SM (82 KB of shared memory each); 4 per SM is a budget of two even
    # waves (round 11: 117 us merge against 158 us at 3 per SM)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, NUM_STAGES=3, programs_per_sm=4)


def merge_tile(M: int, N: int, R: int, device: torch.device,
               w_bytes: int = 2, noise: bool = True) -> tuple[dict, int]:
    """``merge_config`` split into the kernel's meta-parameters (``NUM_STAGES`` 1 unless
    given) and the programs per SM (8 if not given)."""
    cfg = {"NUM_STAGES": 1, **merge_config(M, N, R, device, w_bytes, noise)}
    return cfg, cfg.pop("programs_per_sm", 8)


def walk(M: int, N: int, block_m: int, block_n: int, programs: int) -> tuple[int, int, bool]:
    """``(row_programs, iters, even)`` for a column-panel walk over an ``M x N`` W.

    At most ``programs`` programs in all (the resident slots: one more program per column
    panel would start a second wave, which on the H200 took 11008 x 4096 from 55 to 79 us at
    2 programs per SM), unless the columns alone need more. When the tile divides W and a
    divisor of the row blocks is at least 3/4 of that count, the row programs take it, so
    every walk step is in bounds and the kernel drops its masks (``EVEN``).
    """
    col_blocks = -(-N // block_n)
    row_blocks = -(-M // block_m)
    target = max(1, min(row_blocks, programs // col_blocks))
    if M % block_m == 0 and N % block_n == 0:
        divisor = max(d for d in range(1, target + 1) if row_blocks % d == 0)
        if 4 * divisor >= 3 * target:
            return divisor, row_blocks // divisor, True
    return target, -(-row_blocks // target), False


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_merge(W, X, Y, *, scale, noise, seed, row_offset, rounding, has_delta=True,
                 flag: torch.Tensor | None = None, programs_per_sm: int | None = None,
                 aligned8: bool = True) -> None:
    """Launch the fused merge; nothing is written if ``flag`` (``nonfinite_flag``) is set.
    ``programs_per_sm`` (default: ``merge_config``'s) and ``aligned8=False`` (per-element
    Philox calls, same values) exist for bench/sweep_merge.py."""
    merge, _, _, _ = _kernels()
    M, N = W.shape
    if M == 0 or N == 0:
        return
    R = X.shape[1] if has_delta else 1
    cfg, default_programs = merge_tile(M, N, R, W.device, W.element_size(), noise != 0.0)
    programs_per_sm = programs_per_sm or default_programs
    row_programs, iters, even = walk(M, N, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                     programs_per_sm * _sm_count(W.device))
    aligned8 = aligned8 and N % 8 == 0
    if not (aligned8 and even):  # masked tiles with stochastic rounding (148 registers) and
        cfg.pop("maxnreg", None)  # per-element Philox calls (180-255) spill at 128 (sm_90)
    col_blocks = -(-N // cfg["BLOCK_N"])
    if not has_delta:
        X = Y = W  # never read
    extra = {} if has_delta else {"enable_fp_fusion": False}
    merge.merge_kernel[(col_blocks, row_programs)](
        storage(W), X, Y, flag if flag is not None else storage(W), M, N,
        W.stride(0), W.stride(1), X.stride(0), X.stride(1), Y.stride(0), Y.stride(1),
        float(scale), float(noise) * 2.0 ** -16, int(seed), int(row_offset), row_programs, iters,
        R=R, R_PAD=_pow2_at_least(R, 16),
        HAS_DELTA=has_delta, HAS_NOISE=noise != 0.0,
        STOCHASTIC=rounding == "stochastic" and W.dtype != torch.float32,
        W_KIND=STORAGE_KIND[W.dtype], ALIGNED8=aligned8, EVEN=even,
        HAS_FLAG=flag is not None, **cfg, **extra,
    )


MOMENT_CHUNK = {"cuda": 256, "cpu": 4096}  # rows per Gram partial (bench/sweep_moments.py)
MOMENT_PARTS = 64  # at most this many partials per factor (longer chunks beyond that)
# partial values per factor that the fp64 finalize adds per step (kernels/moments.py): 8192
# (one step at 8192^2, r = 16) took the one-launch moments there from 14.2 to 12.1 us; faster
# in 6 of the 8 r <= 16 cases at 256-row chunks, 0.3-1.1 us slower at 4096^2, r = 8
# (bench/results/tuning/h200_moments_one_launch.json)
MOMENT_VALUES = 8192


def moment_splits(IN: int, OUT: int, max_parts: int, device: torch.device) -> tuple[int, int]:
    """How many programs reduce A's columns and B's rows for the Grams: chunks of
    ``MOMENT_CHUNK`` rows (fewer, longer ones in the interpreter), at most
    ``min(max_parts, MOMENT_PARTS)`` per factor. On the H200 (``bench/sweep_moments.py``)
    256-row chunks took 8192 x 8192, r = 16 from 45 us (2048) to 14 us; past ~64 partials
    the last program's fp64 finalize costs more than the shorter chunks save."""
    chunk = MOMENT_CHUNK["cuda" if device.type == "cuda" else "cpu"]
    cap = min(max_parts, MOMENT_PARTS)
    return max(1, min(cap, -(-IN // chunk))), max(1, min(cap, -(-OUT // chunk)))


def moment_block(r_pad: int, device: torch.device) -> int:
    """Rows per step of a Gram partial: the 3xTF32 operands take ``32 * r_pad * block``
    bytes of shared memory, so 64 KiB at any rank on the GPU (128 rows at r <= 16)."""
    return max(16, 2048 // r_pad) if device.type == "cuda" else 64


_COUNTERS: dict = {}


def arrival_counter(device: torch.device) -> torch.Tensor:
    """The int32 arrival counter of ``moments_kernel`` for the current stream of ``device``:
    zero between launches (the last program of each launch resets it), one per stream so
    concurrent launches on different streams never share one (a captured CUDA graph keeps
    its capture stream's counter, like its workspace: its replays must not overlap each
    other). 4 bytes, kept for the process."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def moments(A, B, scale, *, ema=None) -> torch.Tensor:
    """``[mean, std]`` (fp32, on the device) of ``scale * B @ A``; ``ema=(A_f, B_f, alpha)``."""
    _, mom, _, _ = _kernels()
    R, IN = A.shape
    OUT = B.shape[0]
    R_PAD = _pow2_at_least(R, 16)
    slots = max(2, (1 << 16) // (R_PAD * R_PAD + R_PAD))  # workspace <= 256 KiB up to r = 128
    split_a, split_b = moment_splits(IN, OUT, slots // 2, A.device)
    chunk_a = -(-IN // split_a)
    chunk_b = -(-OUT // split_b)
    ws = torch.empty((split_a + split_b) * (R_PAD * R_PAD + R_PAD), dtype=torch.float32,
                     device=A.device)
    if ema is None:
        A_f, B_f, alpha = A, B, 1.0
    else:
        A_f, B_f, alpha = ema
    out = torch.empty(2, dtype=torch.float32, device=A.device)
    mom.moments_kernel[(split_a + split_b,)](
        storage(A), storage(A_f), storage(B), storage(B_f), ws, arrival_counter(A.device), out,
        R, IN, OUT, A.stride(0), A.stride(1), A_f.stride(0), A_f.stride(1),
        B.stride(0), B.stride(1), B_f.stride(0), B_f.stride(1),
        float(alpha), split_a, split_b, chunk_a, chunk_b, OUT * IN, float(scale),
        EMA=ema is not None, A_KIND=STORAGE_KIND[A.dtype], AF_KIND=STORAGE_KIND[A_f.dtype],
        B_KIND=STORAGE_KIND[B.dtype], BF_KIND=STORAGE_KIND[B_f.dtype], R_PAD=R_PAD,
        BLOCK=moment_block(R_PAD, A.device), VALUES=MOMENT_VALUES,
    )
    return out


def ema_(slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float,
         check: bool = False) -> torch.Tensor | None:
    """One launch per (slow dtype, fast dtype) combination; pairs must be contiguous.

    Returns the int32 device flag the launches read (None when there is nothing to update):
    with ``check`` the non-finite pass over the fast tensors is queued first into it, and a
    non-zero flag means nothing was written; the caller reads it once."""
    groups: dict = {}
    for s, f in zip(slow, fast):
        if s.numel():
            groups.setdefault((s.dtype, f.dtype), []).append((s, f))
    if not groups:
        return None
    skip = torch.zeros(1, dtype=torch.int32, device=next(iter(groups.values()))[0][0].device)
    launches = [ema_launch(pairs) for pairs in groups.values()]
    if check:
        for launch in launches:
            launch(alpha, skip, check=True)
    for launch in launches:
        launch(alpha, skip)
    return skip


EMA_BLOCK = 1024


@functools.lru_cache(maxsize=64)
def _ema_table(key: tuple, device: torch.device):
    """The address and block table of one EMA launch: a function of the pairs' addresses and
    sizes only (``key``), so repeated calls over the same tensors reuse it."""
    slow_ptrs, fast_ptrs, numels = (np.array(col, dtype=np.int64) for col in zip(*key))
    counts = -(-numels // EMA_BLOCK)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    block_tensor = np.repeat(np.arange(len(key)), counts)
    block_start = (np.arange(counts.sum()) - first) * EMA_BLOCK
    table = np.concatenate([slow_ptrs, fast_ptrs, numels, block_tensor, block_start])
    return torch.from_numpy(table.astype(np.int64)).to(device), int(counts.sum())


def ema_launch(pairs):
    """The tables of one EMA launch (one dtype pair); returns ``launch(alpha, skip, check=False)``."""
    _, _, ema, _ = _kernels()
    key = tuple((s.data_ptr(), f.data_ptr(), s.numel()) for s, f in pairs)
    table, nb = _ema_table(key, pairs[0][0].device)
    n = len(pairs)
    kinds = dict(S_KIND=STORAGE_KIND[pairs[0][0].dtype], F_KIND=STORAGE_KIND[pairs[0][1].dtype])

    def launch(alpha, skip, check=False):
        ema.ema_kernel[(nb,)](table[:n], table[n:2 * n], table[2 * n:3 * n],
                              table[3 * n:3 * n + nb], table[3 * n + nb:], skip, float(alpha),
                              CHECK=check, BLOCK=EMA_BLOCK, **kinds)
    return launch


def stream_words(rows: int, cols: int, seed: int, row_offset: int, device) -> torch.Tensor:
    _, _, _, stream = _kernels()
    out = torch.empty(rows, cols, dtype=torch.int32, device=device)
    if rows and cols:
        bm, bn = (64, 128)
        stream.stream_kernel[(-(-rows // bm), -(-cols // bn))](
            out, rows, cols, int(seed), int(row_offset), ALIGNED8=cols % 8 == 0,
            BLOCK_M=bm, BLOCK_N=bn)
    return out.to(torch.int64) & 0xFFFFFFFF
