"""Two versions of the fused merge kernel in one run: time of each and bitwise equality.

The base version is an earlier revision's ``kernels/`` folder, extracted with

    mkdir -p /tmp/base && git archive REV kernels | tar -x -C /tmp/base

and run on a CUDA machine against the working tree's kernels:

    python bench/ab_merge.py --base-dir /tmp/base/kernels --out bench/results/tuning/ab.json

Both versions launch through ``triton_path.launch_merge`` with the working tree's launch
configuration (``merge_config``) and the same inputs; each case reports the graph-timed
device time of both (``lorasc_fast.bench._graph_ms``, W rotated over buffers larger than
L2), their fraction of the measured copy bandwidth, and whether the merged W are equal bit
for bit. The base package is loaded under a private name (never as a top-level
``kernels``, which transformers reserves).
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import triton

from lorasc_fast import bench, triton_path

MODES = [("merge", dict(noise=0.0, rounding="nearest")),
         ("noise", dict(noise=0.1, rounding="nearest")),
         ("noise+sr", dict(noise=0.1, rounding="stochastic"))]
CASES = [((8192, 8192), 16, torch.bfloat16), ((11008, 4096), 16, torch.bfloat16),
         ((4096, 4096), 16, torch.bfloat16), ((28672, 8192), 16, torch.bfloat16),
         ((8192, 8192), 64, torch.bfloat16), ((8192, 8192), 16, torch.float32),
         ((8192, 8192), 16, torch.float16), ((1000, 777), 3, torch.bfloat16)]


def load_base(folder: str):
    """The base revision's ``merge`` module, its package registered as ``_ab_base_kernels``."""
    name = "_ab_base_kernels"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.merge")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-dir", required=True, help="an earlier revision's kernels/ folder")
    p.add_argument("--out", default="bench/results/ab.json")
    args = p.parse_args()
    device = torch.device("cuda")
    new = triton_path._kernels()
    base = (load_base(args.base_dir),) + tuple(new[1:])
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    try:
        for shape, r, dtype in CASES:
            A = torch.randn(r, shape[1], device=device) * 0.05
            B = torch.randn(shape[0], r, device=device) * 0.05
            W0 = torch.randn(shape, device=device).to(dtype)
            rot = bench._Rotation(shape, dtype, device)
            for mode, kw in MODES:
                out, us = {}, {}
                for which, kernels in (("base", base), ("new", new)):
                    triton_path._kernels = lambda kernels=kernels: kernels
                    W = W0.clone()
                    triton_path.launch_merge(W, B, A, scale=2.0, seed=1234, row_offset=5, **kw)
                    out[which] = W
                    us[which] = 1e3 * bench._graph_ms(lambda: triton_path.launch_merge(
                        rot.next(), B, A, scale=2.0, seed=1234, row_offset=5, **kw))
                bits = torch.int32 if dtype == torch.float32 else torch.int16
                row = dict(shape=list(shape), r=r, dtype=str(dtype).split(".")[1], mode=mode,
                           base_us=us["base"], new_us=us["new"],
                           base_frac=2 * W0.nbytes / (us["base"] * 1e-6) / bw,
                           new_frac=2 * W0.nbytes / (us["new"] * 1e-6) / bw,
                           bitwise_equal=torch.equal(out["base"].view(bits), out["new"].view(bits)))
                rows.append(row)
                print(f"{shape[0]}x{shape[1]} r={r} {row['dtype']:8s} {mode:8s} "
                      f"base {us['base']:7.1f} us {row['base_frac']:6.1%}  "
                      f"new {us['new']:7.1f} us {row['new_frac']:6.1%}  "
                      f"equal={row['bitwise_equal']}", flush=True)
    finally:
        triton_path._kernels = lambda: new
    with open(args.out, "w") as f:
        json.dump(dict(copy_bw=bw, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, date=time.strftime("%Y-%m-%d"), rows=rows),
                  f, indent=1)


if __name__ == "__main__":
    main()
