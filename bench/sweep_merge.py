"""Tuning sweep of the fused merge kernel on CUDA (behind triton_path.merge_config).

Times candidate (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES, programs per SM) variants for each mode (merge / merge+noise /
merge+noise+stochastic) and rank, plus where the time goes (noise alone; per-element
Philox calls, 4x the work), with CUDA events (median of `lorasc_fast.bench._median_ms`;
W rotated over buffers larger than L2), as a fraction of measured copy bandwidth.

    python bench/sweep_merge.py --out bench/results/sweep.json
"""
import argparse
import json

import torch
import triton

from lorasc_fast import bench, triton_path

CANDIDATES = [  # BLOCK_M, BLOCK_N, warps, stages, programs/SM (round 5: around round 4's best)
    (16, 256, 4, 4, 8), (16, 256, 4, 4, 6), (16, 256, 4, 4, 12), (16, 256, 4, 3, 8),
    (16, 512, 8, 2, 4), (16, 128, 4, 4, 12),
]
CANDIDATES_R64 = [(16, 128, 4, 3, 6), (16, 128, 4, 3, 8), (16, 128, 4, 2, 6), (32, 128, 4, 2, 4)]


def time_merge(rot, A, B, cand, *, noise, stochastic, has_delta=True, aligned4=True):
    bm, bn, warps, stages, pps = cand
    orig = triton_path.merge_config
    triton_path.merge_config = lambda *a: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                               NUM_STAGES=stages)

    def run():
        triton_path.launch_merge(rot.next(), B, A, scale=2.0, noise=noise, seed=1234,
                                 row_offset=0, rounding="stochastic" if stochastic else "nearest",
                                 has_delta=has_delta, programs_per_sm=pps, aligned4=aligned4)
    try:
        run()
        return bench._median_ms(run, cuda=True)
    finally:
        triton_path.merge_config = orig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/sweep.json")
    p.add_argument("--shape", default="8192x8192")
    args = p.parse_args()
    device = torch.device("cuda")
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    M, N = map(int, args.shape.split("x"))
    rot = bench._Rotation((M, N), torch.bfloat16, device)
    rows = []

    def record(r, mode, cand, **kw):
        try:
            ms = time_merge(rot, A, B, cand, **kw)
        except Exception as e:  # e.g. out of shared memory / registers
            print(f"r={r} {mode} {cand}: {type(e).__name__}", flush=True)
            return
        frac = 4 * M * N / (ms * 1e-3) / bw
        rows.append(dict(r=r, mode=mode, cand=cand, us=ms * 1e3, bw_frac=frac))
        print(f"r={r:3d} {mode:16s} {cand} {ms * 1e3:7.1f} us {frac:6.1%}", flush=True)

    modes = (("merge", dict(noise=0.0, stochastic=False)),
             ("noise", dict(noise=0.1, stochastic=False)),
             ("noise+sr", dict(noise=0.1, stochastic=True)))
    for r in (16, 64):
        A = torch.randn(r, N, device="cuda")
        B = torch.randn(M, r, device="cuda")
        for mode, kw in modes:
            for cand in CANDIDATES if r == 16 else CANDIDATES_R64:
                record(r, mode, cand, **kw)
    # where the time goes, at the default tile: noise alone, and 4x the Philox work
    cand = CANDIDATES[0]
    A = torch.randn(16, N, device="cuda")
    B = torch.randn(M, 16, device="cuda")
    record(16, "noise-only", cand, noise=0.1, stochastic=False, has_delta=False)
    walk = triton_path.walk  # the masked walk on the same shape: what EVEN saves
    triton_path.walk = lambda *a: (*walk(*a)[:2], False)
    record(16, "merge/masked", cand, noise=0.0, stochastic=False)
    record(16, "noise/masked", cand, noise=0.1, stochastic=False)
    triton_path.walk = walk
    record(16, "noise/per-elem", cand, noise=0.1, stochastic=False, aligned4=False)
    record(16, "noise-only/per-elem", cand, noise=0.1, stochastic=False, has_delta=False, aligned4=False)
    best = {}
    for row in rows:
        key = (row["r"], row["mode"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    print("\nbest per case:")
    for key, row in best.items():
        print(key, row["cand"], f"{row['us']:.1f} us {row['bw_frac']:.1%}")
    with open(args.out, "w") as f:
        json.dump(dict(copy_bw=bw, shape=args.shape, gpu=torch.cuda.get_device_name(),
                       torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
