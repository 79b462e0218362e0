"""The torch path's memory bound: no temporary near the size of W (peak RSS in a subprocess)."""
import textwrap

import pytest

from helpers import run_probe

PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    import lorasc_fast as lf
    from lorasc_fast import torch_path
    torch.set_num_threads(1)
    dtype = getattr(torch, sys.argv[1])
    rounding = sys.argv[2]
    W = torch.randn(4096, 4096, dtype=dtype)  # no fp32 staging copy to raise the peak early
    A, B = torch.randn(16, 4096), torch.randn(4096, 16)
    lf.merge_(torch.randn(64, 4096).to(dtype), A, B[:64], noise=0.1)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lf.merge_(W, A, B, scale=2.0, backend="torch")  # a plain merge: the fp32 delta chunks
    lf.merge_(W, A, B, scale=2.0, noise=0.1, seed=1, rounding=rounding, backend="torch")
    lf.cascade_merge_(W, A.clone(), B.clone(), A, B, alpha=0.8, noise_lambda=1.0, backend="torch")
    assert torch_path.merged_finite(W, A, B, scale=2.0, fan_in_fan_out=False)  # a read-only pass
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_bytes": (after - before) * 1024, "w_bytes": W.nbytes}))
""")


@pytest.mark.parametrize("dtype,rounding", [("float32", "nearest"), ("bfloat16", "stochastic")])
def test_torch_path_peak_memory(dtype, rounding):
    out = run_probe(PROBE, dtype, rounding)
    assert out["extra_bytes"] <= out["w_bytes"] / 8, out
