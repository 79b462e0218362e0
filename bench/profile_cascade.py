"""Device time of one ``cascade_merge_`` against ``merge_`` with noise plus ``lowrank_moments``.

The per-call timings of ``lorasc bench`` are host-bound (argument checks, launches, one
sync); this sums the CUDA kernels' device time per call under ``torch.profiler`` so the
target "cascade_merge_ within 5 % of merge_ with noise plus the moments kernel" can be
checked on the device alone. bf16 W, fp32 factors, r = 16.

    python bench/profile_cascade.py [--shapes 8192x8192,28672x8192] [--out FILE]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import lorasc_fast as lf
from lorasc_fast.bench import emit

REPEATS = 5


def device_us(fn, make_args) -> tuple[float, dict]:
    """Mean device time per call (µs) and the per-kernel split, over ``REPEATS`` calls on
    fresh arguments (W rotated so it is not in L2)."""
    args = [make_args() for _ in range(REPEATS)]
    fn(*make_args())  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for a in args:
            fn(*a)
        torch.cuda.synchronize()
    kernels = {e.key: e.device_time_total / REPEATS for e in prof.key_averages()
               if e.device_time_total > 0}
    return sum(kernels.values()), kernels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x8192,28672x8192")
    p.add_argument("--out")
    args = p.parse_args()
    lines = []
    for shape in args.shapes.split(","):
        M, N = map(int, shape.split("x"))

        def factors():
            A = torch.randn(16, N, device="cuda") * 0.02
            B = torch.randn(M, 16, device="cuda") * 0.02
            return A, B

        def cascade_args():
            (A_s, B_s), (A_f, B_f) = factors(), factors()
            W = torch.randn(M, N, device="cuda").bfloat16()
            return W, A_s, B_s, A_f, B_f

        cascade, ck = device_us(lambda W, A_s, B_s, A_f, B_f: lf.cascade_merge_(
            W, A_s, B_s, A_f, B_f, alpha=0.8, scale=2.0, noise_lambda=1.0, seed=3), cascade_args)
        merge, mk = device_us(lambda W, A, B: lf.merge_(W, A, B, scale=2.0, noise=0.01, seed=3),
                              lambda: (torch.randn(M, N, device="cuda").bfloat16(), *factors()))
        moments, mok = device_us(lambda A, B: lf.lowrank_moments(A, B, 2.0), factors)
        lines.append(f"{shape} r=16 bf16: cascade_merge_ {cascade:.1f} us of device time; "
                     f"merge_ + noise {merge:.1f} us + lowrank_moments {moments:.1f} us = "
                     f"{merge + moments:.1f} us; ratio {cascade / (merge + moments):.3f}")
        for name, split in (("cascade_merge_", ck), ("merge_", mk), ("lowrank_moments", mok)):
            lines.append(f"    {name}: " + ", ".join(f"{k[:40]} {v:.1f}" for k, v in split.items()))
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
