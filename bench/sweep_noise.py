"""Where the noise costs: variants of the fused merge's random-number layout, timed on CUDA.

Written for the v3-v5 kernel (``bench/NOTES.md``), which drew one Philox4x32-10 call per
four consecutive elements and interleaved the four outputs into the tile (``tl.join`` +
``tl.reshape``); the library now draws one call per eight (v8). These variants
(bf16 W, speed only; their element-to-word maps differ from the library's stream) test:

- ``split4``: the tile is four column sub-tiles; output ``c_q`` of a call feeds sub-tile
  ``q`` (no interleave; each sub-tile does its own load, product and store);
- ``split8``: eight sub-tiles, each 16-bit half of a word is one element's noise (one
  call per eight elements: enough bits for noise with nearest rounding);
- ``rounds``: Philox with 7 instead of 10 rounds (what the generator's arithmetic costs);
- ``tf32``: the product in one TF32 pass instead of 3xTF32 (what exactness costs).

    python bench/sweep_noise.py --out bench/results/tuning/h200_sweep4_noise.json
"""
import argparse
import json

import torch
import triton
import triton.language as tl

from lorasc_fast import bench, triton_path
from lorasc_fast.kernels.common import load_f32, store_rounded


@triton.jit
def _calls(seed, g, ROUNDS: tl.constexpr):
    g_lo = (g & 0xFFFFFFFF).to(tl.uint32)
    g_hi = (g >> 32).to(tl.uint32)
    zero = g_lo * 0
    return tl.philox(seed, g_lo, g_hi, zero, zero, ROUNDS)


@triton.jit
def _subtile(W, x, Y, rows64, row_ok, col0, N, stride_wm, stride_yk, k, R, words, scale,
             noise_scaled, HAS_DELTA: tl.constexpr, HAS_NOISE: tl.constexpr,
             HALF: tl.constexpr, PRECISION: tl.constexpr, BQ: tl.constexpr,
             W_KIND: tl.constexpr):
    cols = col0 + tl.arange(0, BQ)
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    ptrs = W + rows64[:, None] * stride_wm + cols[None, :]
    v = load_f32(ptrs, mask, W_KIND)
    if HAS_DELTA:
        y = tl.load(Y + k[:, None] * stride_yk + cols[None, :],
                    mask=(k[:, None] < R) & col_ok[None, :], other=0.0)
        v = v + tl.dot(x, y, input_precision=PRECISION) * scale
    if HAS_NOISE:
        if HALF:
            v = v + (words.to(tl.float32) - 32767.5) * noise_scaled
        else:
            v = v + ((words >> 16).to(tl.float32) - 32767.5) * noise_scaled
    store_rounded(ptrs, v, mask, words, W_KIND, False)


@triton.jit
def _sub_words(c0, c1, c2, c3, Q: tl.constexpr, HALF: tl.constexpr):
    """Sub-tile ``Q``'s draws: output ``Q`` of the call, or with ``HALF`` the high (even ``Q``)
    or low (odd ``Q``) 16 bits of output ``Q // 2``."""
    OUT: tl.constexpr = Q // 2 if HALF else Q
    if OUT == 0:
        word = c0
    elif OUT == 1:
        word = c1
    elif OUT == 2:
        word = c2
    else:
        word = c3
    if HALF:
        if Q % 2 == 0:
            word = word >> 16
        else:
            word = word & 0xFFFF
    return word


@triton.jit
def split_kernel(W, X, Y, M, N, stride_wm, stride_xm, stride_yk, scale, noise_scaled, seed,
                 ROW_PROGRAMS, ITERS, R, R_PAD: tl.constexpr, HAS_DELTA: tl.constexpr,
                 HAS_NOISE: tl.constexpr, SPLIT: tl.constexpr, ROUNDS: tl.constexpr,
                 PRECISION: tl.constexpr, W_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    BQ: tl.constexpr = BLOCK_N // SPLIT
    HALF: tl.constexpr = SPLIT == 8
    col0 = tl.program_id(0) * BLOCK_N
    k = tl.arange(0, R_PAD)
    for i in tl.range(0, ITERS, num_stages=NUM_STAGES):
        rows = (tl.program_id(1) + i * ROW_PROGRAMS) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + k[None, :],
                    mask=row_ok[:, None] & (k[None, :] < R), other=0.0)
        g = (rows64 * N + col0)[:, None] // SPLIT + tl.arange(0, BQ)[None, :].to(tl.int64)
        c0, c1, c2, c3 = _calls(seed, g, ROUNDS)
        for q in tl.static_range(SPLIT):
            _subtile(W, x, Y, rows64, row_ok, col0 + q * BQ, N, stride_wm, stride_yk, k, R,
                     _sub_words(c0, c1, c2, c3, q, HALF), scale, noise_scaled, HAS_DELTA,
                     HAS_NOISE, HALF, PRECISION, BQ, W_KIND)


def launch_split(W, X, Y, *, noise, has_delta, split, rounds=10, precision="tf32x3",
                 block_m=16, block_n=256, warps=4, stages=4, programs_per_sm=8):
    M, N = W.shape
    R = X.shape[1]
    col_blocks = -(-N // block_n)
    row_blocks = -(-M // block_m)
    row_programs = max(1, min(row_blocks, -(-programs_per_sm * triton_path._sm_count(W.device)
                                             // col_blocks)))
    split_kernel[(col_blocks, row_programs)](
        triton_path.storage(W), X, Y, M, N, W.stride(0), X.stride(0), Y.stride(0), 2.0,
        noise * 2.0 ** -16, 1234, row_programs, -(-row_blocks // row_programs), R,
        R_PAD=max(16, triton.next_power_of_2(R)), HAS_DELTA=has_delta, HAS_NOISE=noise != 0.0,
        SPLIT=split, ROUNDS=rounds, PRECISION=precision, W_KIND=triton_path.STORAGE_KIND[W.dtype],
        BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_STAGES=stages, num_warps=warps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/tuning/sweep_noise.json")
    p.add_argument("--shape", default="8192x8192")
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args()
    device = torch.device("cuda")
    bw = bench.copy_bandwidth(device)
    M, N = map(int, args.shape.split("x"))
    rot = bench._Rotation((M, N), torch.bfloat16, device)
    A = torch.randn(args.r, N, device="cuda") * 0.01
    B = torch.randn(M, args.r, device="cuda") * 0.01

    def timed(fn):
        fn(rot.next())
        ms = bench._median_ms(lambda: fn(rot.next()), cuda=True)
        return ms * 1e3, 4 * M * N / (ms * 1e-3) / bw

    rows = []

    def record(name, fn, **kw):
        try:
            us, frac = timed(fn)
        except Exception as e:  # out of resources for a tile shape
            print(f"{name:42s} {kw} failed: {type(e).__name__}", flush=True)
            return
        rows.append(dict(variant=name, us=us, frac_copy_bw=frac, **kw))
        print(f"{name:42s} {kw} {us:8.1f} us {100 * frac:5.1f} %", flush=True)

    lib = dict(scale=2.0, seed=1234, row_offset=0, rounding="nearest")
    record("library merge", lambda W: triton_path.launch_merge(W, B, A, noise=0.0, **lib))
    record("library merge+noise", lambda W: triton_path.launch_merge(W, B, A, noise=0.01, **lib))
    record("library noise only",
           lambda W: triton_path.launch_merge(W, B, A, noise=0.01, has_delta=False, **lib))
    configs = [(16, 256, 4, 4, 8), (16, 512, 4, 4, 4), (16, 512, 8, 3, 4), (32, 256, 8, 3, 4),
               (32, 512, 8, 3, 2), (8, 512, 4, 4, 8)]
    for bm, bn, warps, stages, pps in configs:
        cfg = dict(block_m=bm, block_n=bn, warps=warps, stages=stages, programs_per_sm=pps)
        for split in (4, 8):
            for has_delta, noise in ((True, 0.0), (True, 0.01), (False, 0.01)):
                name = f"split{split} " + ("merge" if has_delta else "") + \
                    ("+noise" if noise and has_delta else "noise only" if noise else "")
                record(name, lambda W: launch_split(W, B, A, noise=noise, has_delta=has_delta,
                                                    split=split, **cfg), **cfg)
    best = dict(block_m=16, block_n=256, warps=4, stages=4, programs_per_sm=8)
    for split in (4, 8):
        record(f"split{split} merge+noise, 7 rounds",
               lambda W: launch_split(W, B, A, noise=0.01, has_delta=True, split=split, rounds=7,
                                      **best), **best)
        record(f"split{split} merge, tf32",
               lambda W: launch_split(W, B, A, noise=0.0, has_delta=True, split=split,
                                      precision="tf32", **best), **best)
        record(f"split{split} merge+noise, tf32",
               lambda W: launch_split(W, B, A, noise=0.01, has_delta=True, split=split,
                                      precision="tf32", **best), **best)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, shape=[M, N], r=args.r,
                       copy_bw=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
