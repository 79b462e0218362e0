"""One launch of each fused-merge mode at 8192² bf16 for a hardware-counter profile:

    ncu --clock-control none -k regex:merge_kernel --launch-skip 3 --launch-count 3 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \\
        python bench/ncu_merge.py [--r 64]

Order of the launches: merge, merge + noise, merge + noise + stochastic rounding (after one
warm-up of each).
"""
import argparse

import torch

from lorasc_fast import triton_path

p = argparse.ArgumentParser()
p.add_argument("--r", type=int, default=16)
r = p.parse_args().r
W = torch.randn(8192, 8192, device="cuda").bfloat16()
A = torch.randn(r, 8192, device="cuda") * 0.01
B = torch.randn(8192, r, device="cuda") * 0.01
args = dict(scale=2.0, seed=1, row_offset=0)
modes = [dict(noise=0.0, rounding="nearest"), dict(noise=0.01, rounding="nearest"),
         dict(noise=0.01, rounding="stochastic")]
for m in modes:  # compile outside the profiled launches
    triton_path.launch_merge(W, B, A, **args, **m)
torch.cuda.synchronize()
for m in modes:
    triton_path.launch_merge(W, B, A, **args, **m)
torch.cuda.synchronize()
