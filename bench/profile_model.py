"""Where a whole-model boundary's time goes: device time per kernel of a planned boundary.

Builds the model's layers as ``lorasc bench`` does (bf16 W, fp32 factors), runs the
planned boundary (``CascadePlan.launch`` + the one flag read) a few times under
``torch.profiler`` and prints the CUDA kernels by total device time, plus the wall time
per boundary, so the merge kernels' share can be compared with the single-layer rate.

    python bench/profile_model.py [--model llama2-7b-qv|llama3-8b-all] [--out FILE]
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lorasc_fast.bench import emit, model_cascade_layers, planned_boundary

REPEATS = 5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama2-7b-qv")
    p.add_argument("--out")
    args = p.parse_args()
    layers = model_cascade_layers(args.model, torch.device("cuda"))
    boundary = planned_boundary(layers)
    for _ in range(3):
        boundary()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            boundary()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / REPEATS
    weight_bytes = sum(layer.W.nbytes for layer in layers)
    lines = [f"{args.model}: {len(layers)} modules, {weight_bytes / 2**30:.2f} GiB of W; "
             f"{wall_ms:.2f} ms per boundary (wall, under the profiler)",
             f"{'kernel':60s} {'calls':>6s} {'device ms / boundary':>22s}"]
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    for e in events:
        if e.device_time_total <= 0:
            continue
        lines.append(f"{e.key[:60]:60s} {e.count // REPEATS:6d} "
                     f"{e.device_time_total / 1e3 / REPEATS:22.3f}")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
