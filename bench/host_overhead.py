"""Where a single public call's host time goes (CUDA): each piece of ``merge_`` timed alone
on a tiny W (so the GPU work is negligible and the time is the host's), 300 calls each.

    python bench/host_overhead.py
"""
import time

import torch

from lorasc_fast import ops, triton_path
from lorasc_fast.bench import qv_adapter_set
from lorasc_fast import validation as v


def per_call_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    W = torch.randn(64, 256, device="cuda").bfloat16()
    A = torch.randn(16, 256, device="cuda")
    B = torch.randn(64, 16, device="cuda")
    kw = dict(scale=2.0, seed=1, row_offset=0, rounding="nearest")

    def validation():
        ops._check_common(W, "nearest", 1, 0, None)
        ops._check_factors(W, A, B, False)
        v.check_same_device(W=W, A=A, B=B)
        v.check_scalar("scale", 2.0)
        v.check_scalar("noise", 0.1, low=0.0)
        v.check_no_alias("W", W, A=A, B=B)

    pieces = {
        "torch.cuda.synchronize()": lambda: torch.cuda.synchronize(),
        "validation (python)": validation,
        "check_finite (names culprits; incl. sync)": lambda: v.check_finite(A=A, B=B),
        "nonfinite_flag (queued, no sync)": lambda: triton_path.nonfinite_flag([A, B]),
        "nonfinite_flag + flag read (sync)": lambda: triton_path.nonfinite_flag([A, B]).item(),
        "launch_merge, merge (async)": lambda: triton_path.launch_merge(W, B, A, noise=0.0, **kw),
        "launch_merge, merge+noise (async)": lambda: triton_path.launch_merge(W, B, A, noise=0.1, **kw),
        "ops.merge_ (whole call)": lambda: ops.merge_(W, A, B, scale=2.0, noise=0.1, seed=1),
        "ops.lowrank_moments (whole call)": lambda: ops.lowrank_moments(A, B, 2.0),
        "triton_path.moments (async)": lambda: triton_path.moments(A, B, 2.0),
        "torch add_ (one tiny launch)": lambda: W.add_(1.0),
    }
    slow, fast = qv_adapter_set("cuda")
    pieces.update({
        "ema_, 128 tensors (whole call)": lambda: ops.ema_(slow, fast, 0.8),
        "  check_sequences": lambda: v.check_sequences(slow, fast),
        "  check_same_device": lambda: v.check_same_device(**{f"s{i}": t for i, t in enumerate(slow)}),
        "  check_finite (incl. sync)": lambda: v.check_finite(**{f"f{i}": t for i, t in enumerate(fast)}),
        "  ema_launch tables": lambda: triton_path.ema_launch(list(zip(slow, fast))),
        "  triton_path.ema_ (async)": lambda: triton_path.ema_(slow, fast, 0.8),
    })
    for name, fn in pieces.items():
        print(f"{name:40s} {per_call_us(fn):8.1f} us", flush=True)


if __name__ == "__main__":
    main()
