"""Tuning sweep of the grouped whole-model boundary (``CascadePlan``) on CUDA.

For the Llama-2-7B q,v and Llama-3-8B all-linear sets of ``lorasc bench``, times the planned
boundary (moments + EMA + merge + noise, one flag read) while varying how many programs
each module's merge gets: at most ``programs/SM * SMs / column blocks`` row programs, and
at least ``min iters`` row blocks walked by each program.

    python bench/sweep_group.py --out bench/results/tuning/h200_sweep_group.json
"""
import argparse
import json

import torch
import triton

from lorasc_fast import bench, group_plan

VARIANTS = [(8, 1), (8, 16), (8, 32), (8, 64), (4, 32), (3, 32)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/tuning/sweep_group.json")
    args = p.parse_args()
    device = torch.device("cuda")
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    for pps, min_iters in VARIANTS:
        group_plan._MAX_PROGRAMS_PER_SM, group_plan._MIN_ITERS = pps, min_iters
        for kind in ("llama2-7b-qv", "llama3-8b-all"):
            m = bench.bench_model(kind, device, bw)
            rows.append(dict(programs_per_sm=pps, min_iters=min_iters, **m))
            print(f"{kind:14s} programs/SM {pps:2d} min iters {min_iters:3d}: planned {m['ms']:.2f} ms "
                  f"({m['bw_frac']:.1%}), one call {m['ms_one_call']:.2f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, copy_bw=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
