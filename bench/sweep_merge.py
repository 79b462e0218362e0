"""Tuning sweep of the fused merge kernel on CUDA (behind triton_path.merge_config).

Times candidate (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES, programs per SM) variants for each mode (merge / merge+noise /
merge+noise+stochastic) and rank, plus where the time goes (noise alone; per-element
Philox calls, 8x the work), with CUDA events (median of `lorasc_fast.bench._median_ms`;
W rotated over buffers larger than L2), as a fraction of measured copy bandwidth.

    python bench/sweep_merge.py --out bench/results/sweep.json
"""
import argparse
import json

import torch
import triton

from lorasc_fast import bench, triton_path

CANDIDATES = [  # BLOCK_M, BLOCK_N, warps, stages, programs/SM[, maxnreg] (round 12: carried
    (64, 64, 4, 3, 4, 128), (64, 64, 4, 4, 4, 128), (64, 64, 4, 3, 4),  # pointers and counters)
    (64, 128, 4, 3, 2), (64, 128, 4, 4, 2), (128, 128, 8, 3, 1), (128, 64, 8, 3, 2, 128),
]
CANDIDATES_R64 = [  # round 11: round 10's best (64 x 64, 4 per SM) against register caps
    (64, 64, 4, 3, 4), (64, 64, 4, 2, 3, 168), (64, 32, 4, 3, 4), (64, 128, 4, 2, 2)]


def time_merge(rot, A, B, cand, *, noise, stochastic, has_delta=True, aligned8=True):
    bm, bn, warps, stages, pps, *maxnreg = cand
    orig = triton_path.merge_config
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, NUM_STAGES=stages)
    if maxnreg:
        cfg["maxnreg"] = maxnreg[0]
    triton_path.merge_config = lambda *a: cfg

    def run():
        triton_path.launch_merge(rot.next(), B, A, scale=2.0, noise=noise, seed=1234,
                                 row_offset=0, rounding="stochastic" if stochastic else "nearest",
                                 has_delta=has_delta, programs_per_sm=pps, aligned8=aligned8)
    try:
        run()
        return bench._median_ms(run, cuda=True)
    finally:
        triton_path.merge_config = orig


def where_the_time_goes(record, M, N):
    """At the default tile: noise alone, the masked walk (what EVEN saves), and one Philox
    call per element (8x the generator's work: the stream serves eight elements a call)."""
    cand = CANDIDATES[0]
    A = torch.randn(16, N, device="cuda")
    B = torch.randn(M, 16, device="cuda")
    record(A, B, 16, "noise-only", cand, noise=0.1, stochastic=False, has_delta=False)
    walk = triton_path.walk
    triton_path.walk = lambda *a: (*walk(*a)[:2], False)
    record(A, B, 16, "merge/masked", cand, noise=0.0, stochastic=False)
    record(A, B, 16, "noise/masked", cand, noise=0.1, stochastic=False)
    triton_path.walk = walk
    record(A, B, 16, "noise/per-elem", cand, noise=0.1, stochastic=False, aligned8=False)
    record(A, B, 16, "noise-only/per-elem", cand, noise=0.1, stochastic=False, has_delta=False,
           aligned8=False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/sweep.json")
    p.add_argument("--shape", default="8192x8192")
    p.add_argument("--ranks", default="16,64", help="comma-separated ranks to sweep")
    p.add_argument("--no-extras", action="store_true", help="skip the where-the-time-goes rows")
    p.add_argument("--dtype", default="bfloat16", help="W's dtype (bfloat16, float16, float32)")
    p.add_argument("--candidates", help="BMxBNxWARPSxSTAGESxPPS[xMAXNREG],... instead of the lists")
    args = p.parse_args()
    custom = [tuple(map(int, c.split("x"))) for c in args.candidates.split(",")] if args.candidates else None
    device = torch.device("cuda")
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    M, N = map(int, args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    rot = bench._Rotation((M, N), dtype, device)
    rows = []

    def record(A, B, r, mode, cand, **kw):
        try:
            ms = time_merge(rot, A, B, cand, **kw)
        except Exception as e:  # e.g. out of shared memory / registers
            print(f"r={r} {mode} {cand}: {type(e).__name__}", flush=True)
            return
        frac = 2 * M * N * dtype.itemsize / (ms * 1e-3) / bw
        rows.append(dict(r=r, mode=mode, cand=cand, us=ms * 1e3, bw_frac=frac))
        print(f"r={r:3d} {mode:16s} {cand} {ms * 1e3:7.1f} us {frac:6.1%}", flush=True)

    modes = (("merge", dict(noise=0.0, stochastic=False)),
             ("noise", dict(noise=0.1, stochastic=False)),
             ("noise+sr", dict(noise=0.1, stochastic=True)))
    for r in map(int, args.ranks.split(",")):
        A = torch.randn(r, N, device="cuda")
        B = torch.randn(M, r, device="cuda")
        for mode, kw in modes:
            for cand in custom or (CANDIDATES if r == 16 else CANDIDATES_R64):
                record(A, B, r, mode, cand, **kw)
    if not args.no_extras:
        where_the_time_goes(record, M, N)
    best = {}
    for row in rows:
        key = (row["r"], row["mode"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    print("\nbest per case:")
    for key, row in best.items():
        print(key, row["cand"], f"{row['us']:.1f} us {row['bw_frac']:.1%}")
    with open(args.out, "w") as f:
        json.dump(dict(copy_bw=bw, shape=args.shape, dtype=args.dtype, gpu=torch.cuda.get_device_name(),
                       torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
