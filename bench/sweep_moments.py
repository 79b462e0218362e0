"""Tuning sweep of the one-launch moments kernel (Gram partials + fp64 finalize) on CUDA.

The partials' work split (``triton_path.MOMENT_CHUNK``: rows of A^T / B per program) for
several shapes and ranks, with and without the EMA on the fly: device time from CUDA-graph
replay (``bench._graph_ms``), each result checked against the default split, and the
values per factor that the finalize adds per step (``triton_path.MOMENT_VALUES``); then the
whole-model boundaries (whose grouped moments use the same minimum chunk) at each chunk size.

    python bench/sweep_moments.py --out bench/results/tuning/h200_sweep_moments.json
"""
import argparse
import json

import torch
import triton

from lorasc_fast import bench, triton_path

CHUNKS = [2048, 1024, 512, 256, 128]
VALUES = [4096]  # partial values per factor per finalize step (--values)
CASES = [(4096, 4096, 8), (8192, 8192, 16), (8192, 8192, 64), (28672, 8192, 16), (4096, 14336, 16)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/tuning/sweep_moments.json")
    p.add_argument("--no-models", action="store_true")
    p.add_argument("--chunks", help="comma-separated chunk sizes (default: %s)" % CHUNKS)
    p.add_argument("--values", help="comma-separated finalize step sizes (default: %s)" % VALUES)
    p.add_argument("--ranks", help="comma-separated ranks to keep (default: all cases)")
    args = p.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else CHUNKS
    steps = [int(v) for v in args.values.split(",")] if args.values else VALUES
    cases = [c for c in CASES if not args.ranks or str(c[2]) in args.ranks.split(",")]
    device = torch.device("cuda")
    default = triton_path.MOMENT_CHUNK["cuda"]
    default_values = triton_path.MOMENT_VALUES
    rows = []
    for out_f, in_f, r in cases:
        A, A_f = (torch.randn(r, in_f, device=device) for _ in range(2))
        B, B_f = (torch.randn(out_f, r, device=device) for _ in range(2))
        for ema in (None, (A_f, B_f, 0.6)):
            want = triton_path.moments(A, B, 2.0, ema=ema)
            for chunk in chunks:
                for v in steps:
                    triton_path.MOMENT_CHUNK["cuda"] = chunk
                    triton_path.MOMENT_VALUES = v
                    got = triton_path.moments(A, B, 2.0, ema=ema)
                    rel = ((got - want).abs() / want.abs()).max().item()
                    us = bench._graph_ms(lambda: triton_path.moments(A, B, 2.0, ema=ema)) * 1e3
                    rows.append(dict(shape=[out_f, in_f], r=r, ema=ema is not None, chunk=chunk,
                                     values=v, us=us, rel_diff_vs_default=rel))
                    print(f"{out_f}x{in_f} r={r:2d} ema={ema is not None!s:5} chunk {chunk:4d} "
                          f"values {v:5d}: {us:7.1f} us (rel. diff {rel:.1e})", flush=True)
            triton_path.MOMENT_CHUNK["cuda"] = default
            triton_path.MOMENT_VALUES = default_values
    models = []
    if not args.no_models:
        bw = bench.copy_bandwidth(device)
        for chunk in dict.fromkeys((default, *chunks)):  # the default first, each chunk once
            triton_path.MOMENT_CHUNK["cuda"] = chunk
            for kind in ("llama2-7b-qv", "llama3-8b-all"):
                m = bench.bench_model(kind, device, bw)
                models.append(dict(chunk=chunk, **m))
                print(f"{kind} chunk {chunk}: planned {m['ms']:.2f} ms ({m['bw_frac']:.1%})",
                      flush=True)
        triton_path.MOMENT_CHUNK["cuda"] = default
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, rows=rows, models=models), f, indent=1)


if __name__ == "__main__":
    main()
