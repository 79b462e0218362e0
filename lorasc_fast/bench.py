"""``lorasc bench``: the fused ops against their peers, measured in one process.

On CUDA: the device-to-device copy bandwidth first (bytes read + written), then per W
shape x rank x dtype the median time (CUDA events, ``triton.testing.do_bench``; W rotated
over buffers larger than L2) and the extra peak device memory of

* ours: ``merge_`` without noise, with noise, with noise + stochastic rounding,
  ``cascade_merge_`` (moments + EMA + merge + noise) and ``lowrank_moments``, each one
  public call (validation, the finite check and its sync, the launch); and the three merge
  modes' kernel alone ("kernel": 16 launches captured in a CUDA graph, replay time / 16 —
  the device time without host overhead);
* peers: PEFT's ``LoraLayer.merge`` on an equivalent layer, the eager merge + noise
  (``delta = B @ A * s; W += delta + (rand - 0.5) * lam * delta.std()``), ``torch.compile``
  of the same, and cuBLAS ``W.addmm_`` (no noise),

then the EMA of a whole adapter set and whole-model cascade boundaries
(``cascade_merge_many_``). The floor of an in-place pass is ``2 * W.nbytes / copy
bandwidth``; "% BW" is that floor over the measured time. Without CUDA it times the torch
path against PEFT's CPU merge at small sizes (all variants of a case timed round-robin, median
of 15 rounds: the shared CPU's slow phases hit every variant alike). Writes JSON, CSV and a
PNG plot.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import time

import torch

from . import ops
from .batched import CascadeLayer, cascade_merge_many_
from .group_plan import CascadePlan

SHAPES_GPU = [(4096, 4096, 16), (11008, 4096, 16), (8192, 8192, 16), (8192, 8192, 64),
              (28672, 8192, 16)]
SHAPES_CPU = [(1024, 1024, 16), (2048, 1024, 8)]


def add_arguments(p):
    p.add_argument("--out", default="bench/results", help="directory for JSON, CSV and PNG")
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model boundaries")


# ---------------------------------------------------------------- timing and memory
def _median_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return _round_robin_ms({"fn": fn}, reps=5)["fn"]


def _graph_ms(fn, launches: int = 16) -> float:
    """Device time of one ``fn`` (asynchronous launches only): ``launches`` calls captured
    in one CUDA graph, median replay time over ``launches`` (no host overhead; W rotation
    keeps the data out of L2)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return sorted(times)[len(times) // 2]


def _round_robin_ms(fns: dict, reps: int = 15) -> dict:
    """CPU: each function once per round, ``reps`` rounds, median per function. Interleaving
    spreads the shared machine's slow phases over all variants instead of one of them."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def extra_peak_bytes(fn, cuda: bool) -> int | None:
    """Peak device memory ``fn`` allocates beyond what was allocated before it (None off CUDA)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class _Rotation:
    """Several copies of W so repeated runs do not hit L2 (60 MB on the H200)."""

    def __init__(self, shape, dtype, device, min_bytes=256 << 20):
        one = math.prod(shape) * torch.finfo(dtype).bits // 8
        count = max(1, min(8, -(-min_bytes // one))) if device.type == "cuda" else 1
        self.Ws = [torch.randn(shape, device=device).to(dtype) for _ in range(count)]
        self.i = 0

    def next(self):
        self.i += 1
        return self.Ws[self.i % len(self.Ws)]


def copy_bandwidth(device) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device.type == "cuda")
    return 2 * n / (ms * 1e-3)


# ---------------------------------------------------------------- the variants
def _peft_layer(out_f, in_f, r, dtype, device):
    """A real PEFT LoRA ``Linear`` (fp32 adapter, as PEFT creates it) on a W of ``dtype``."""
    from peft import LoraConfig, get_peft_model
    base = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype))
    layer = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])).base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return layer


def _variants(out_f, in_f, r, dtype, device, rot, with_compile):
    s, lam = 2.0, 1.0
    A = torch.randn(r, in_f, device=device)
    B = torch.randn(out_f, r, device=device)
    A_f, B_f = torch.randn_like(A), torch.randn_like(B)
    A_s, B_s = A.clone(), B.clone()
    ours = {
        "merge": lambda: ops.merge_(rot.next(), A, B, scale=s),
        "merge+noise": lambda: ops.merge_(rot.next(), A, B, scale=s, noise=0.1, seed=1),
        "merge+noise+sr": lambda: ops.merge_(rot.next(), A, B, scale=s, noise=0.1, seed=1,
                                             rounding="stochastic"),
        # alpha=1 keeps the slow factors fixed over repetitions (same work as any alpha)
        "cascade_merge": lambda: ops.cascade_merge_(rot.next(), A_s, B_s, A_f, B_f, alpha=1.0,
                                                    scale=s, noise_lambda=lam, seed=2),
        "moments": lambda: ops.lowrank_moments(A, B, s),
    }
    if device.type == "cuda":  # the fused kernel alone: no validation, finite check or sync
        from . import triton_path as tp
        for name, kw in (("merge", dict(noise=0.0)), ("merge+noise", dict(noise=0.1)),
                         ("merge+noise+sr", dict(noise=0.1, rounding="stochastic"))):
            kw = {"rounding": "nearest", **kw}
            ours[f"{name} kernel"] = (lambda kw: lambda: tp.launch_merge(
                rot.next(), B, A, scale=s, seed=1, row_offset=0, **kw))(kw)
        ours["moments kernel"] = lambda: tp.moments(A, B, s)
    peers = {}
    layer = _peft_layer(out_f, in_f, r, dtype, device)

    def peft_merge():
        layer.merged_adapters.clear()
        layer.merge()
    peers["peft_merge"] = peft_merge
    A_w, B_w = A.to(dtype), B.to(dtype)
    peers["addmm"] = lambda: rot.next().addmm_(B_w, A_w, alpha=s)

    def eager(W, A, B):
        delta = (B @ A) * s
        W += (delta + (torch.rand_like(delta) - 0.5) * lam * delta.std()).to(W.dtype)
    peers["eager_merge+noise"] = lambda: eager(rot.next(), A, B)
    if with_compile:
        compiled = torch.compile(eager, dynamic=False)
        peers["compile_merge+noise"] = lambda: compiled(rot.next(), A, B)
    return ours, peers


def bench_case(out_f, in_f, r, dtype, device, bw, with_compile=True, peers_too=True):
    cuda = device.type == "cuda"
    rot = _Rotation((out_f, in_f), dtype, device)
    ours, peers = _variants(out_f, in_f, r, dtype, device, rot, with_compile and cuda and peers_too)
    if not peers_too:
        peers = {k: v for k, v in peers.items() if k in ("peft_merge", "addmm")}
    floor_ms = 2 * out_f * in_f * torch.finfo(dtype).bits / 8 / bw * 1e3
    rows = []
    cpu_ms = {} if cuda else _round_robin_ms({**ours, **peers})
    for who, table in (("ours", ours), ("peer", peers)):
        for name, fn in table.items():
            try:
                if not cuda:
                    ms = cpu_ms[name]
                elif name.endswith(" kernel"):
                    ms = _graph_ms(fn)
                else:
                    ms = _median_ms(fn, cuda)
                extra = extra_peak_bytes(fn, cuda)
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                print(f"  {name}: {type(e).__name__}: {e}")
                continue
            rows.append(dict(shape=f"{out_f}x{in_f}", r=r, dtype=str(dtype).replace("torch.", ""),
                             who=who, variant=name, ms=ms, floor_ms=floor_ms,
                             bw_frac=None if name.startswith("moments") else floor_ms / ms,
                             extra_mib=None if extra is None else extra / 2**20))
    return rows


def qv_adapter_set(device):
    """(slow, fast) of a Llama-2-7B q,v adapter set: 64 pairs of (8 x 4096, 4096 x 8) fp32 each."""
    slow = [torch.randn(s, device=device) for _ in range(64) for s in ((8, 4096), (4096, 8))]
    return slow, [torch.randn_like(t) for t in slow]


def bench_ema(device, bw):
    """EMA of a Llama-2-7B q,v adapter set (``qv_adapter_set``)."""
    cuda = device.type == "cuda"
    slow, fast = qv_adapter_set(device)
    nbytes = 3 * sum(t.nbytes for t in slow)
    floor = nbytes / bw * 1e3

    def loop():
        for s_, f_ in zip(slow, fast):
            s_.mul_(0.8).add_(f_, alpha=0.2)
    variants = {"ours ema_": lambda: ops.ema_(slow, fast, 0.8),
                "torch._foreach_lerp_": lambda: torch._foreach_lerp_(slow, fast, 0.2),
                "python loop mul_/add_": loop}
    return [dict(variant=k, ms=_median_ms(fn, cuda), floor_ms=floor) for k, fn in variants.items()]


def model_layers(kind: str):
    """(out, in, r) of every adapted module: 'llama2-7b-qv' or 'llama3-8b-all'."""
    if kind == "llama2-7b-qv":
        return [(4096, 4096, 8)] * 64
    per_layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
                 (14336, 4096), (4096, 14336)]
    return [(o, i, 16) for _ in range(32) for o, i in per_layer]


def model_cascade_layers(kind: str, device) -> list[CascadeLayer]:
    """The adapted modules of ``model_layers(kind)``: bf16 W, fp32 factors ~ N(0, 0.01^2)
    (slow = fast), scale 2, seed = the module's index."""
    layers = []
    for n, (o, i, r) in enumerate(model_layers(kind)):
        W = torch.randn(o, i, device=device, dtype=torch.bfloat16)
        A, B = torch.randn(r, i, device=device) * 0.01, torch.randn(o, r, device=device) * 0.01
        layers.append(CascadeLayer(W, A, B, A.clone(), B.clone(), scale=2.0, seed=n))
    return layers


def planned_boundary(layers):
    """What a controller holding the plan pays per boundary: a function running
    ``CascadePlan.launch`` and its one flag read (the plan is built here, once)."""
    plan = CascadePlan(layers)
    seeds = [layer.seed for layer in layers]

    def boundary():
        plan.launch(1.0, 1.0, seeds)
        plan.flag.item()
    return boundary


def bench_model(kind: str, device, bw):
    cuda = device.type == "cuda"
    layers = model_cascade_layers(kind, device)
    wbytes = sum(layer.W.nbytes for layer in layers)
    floor = 2 * wbytes / bw * 1e3
    one_call = lambda: cascade_merge_many_(layers, alpha=1.0, noise_lambda=1.0)  # noqa: E731
    ms_call = _median_ms(one_call, cuda)
    extra = extra_peak_bytes(one_call, cuda)
    ms = _median_ms(planned_boundary(layers), cuda)
    return dict(model=kind, modules=len(layers), weight_gib=wbytes / 2**30,
                ms=ms, ms_one_call=ms_call, floor_ms=floor, bw_frac=floor / ms,
                bw_frac_one_call=floor / ms_call, extra_mib=None if extra is None else extra / 2**20)


# ---------------------------------------------------------------- report
def emit(text: str, path: str | None) -> None:
    """Print a report and, with ``path``, write it there too (the bench/ profiling scripts)."""
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def _environment(device, bw):
    import triton
    import peft
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, triton=triton.__version__, peft=peft.__version__,
               python=platform.python_version(), copy_bw_tb_s=bw / 1e12, device=device.type)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def _print_table(rows):
    print(f"{'shape':>11} {'r':>3} {'dtype':>8} {'variant':>22} {'time':>10} {'% BW':>6} {'extra':>10}")
    for row in rows:
        frac = "" if row["bw_frac"] is None else f"{row['bw_frac']:6.1%}"
        extra = "" if row["extra_mib"] is None else f"{row['extra_mib']:7.2f} MiB"
        print(f"{row['shape']:>11} {row['r']:>3} {row['dtype']:>8} {row['variant']:>22} "
              f"{row['ms'] * 1e3:8.1f}us {frac:>6} {extra:>10}")


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = []
    for row in rows:
        key = (row["shape"], row["r"], row["dtype"])
        if row["bw_frac"] is not None and key not in cases:
            cases.append(key)
    variants = [v for v in ("merge kernel", "merge+noise kernel", "merge+noise+sr kernel", "merge",
                            "merge+noise", "merge+noise+sr", "cascade_merge", "addmm",
                            "compile_merge+noise", "peft_merge", "eager_merge+noise")
                if any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.5))
    width = 0.8 / len(variants)
    for j, var in enumerate(variants):
        ys = []
        for key in cases:
            match = [r for r in rows if (r["shape"], r["r"], r["dtype"]) == key and r["variant"] == var]
            ys.append(match[0]["bw_frac"] * 100 if match else 0)
        hatch = "//" if var in ("addmm", "compile_merge+noise", "peft_merge", "eager_merge+noise") else ""
        ax.bar([i + j * width for i in range(len(cases))], ys, width, label=var, hatch=hatch)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{s}\nr={r} {d}" for s, r, d in cases], fontsize=8)
    ax.set_ylabel("% of copy bandwidth (floor / time)")
    ax.set_title("In-place merge: lorasc-fast (solid) vs peers (hatched)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth(device)
    env = _environment(device, bw)
    print(f"{env.get('gpu', env.get('cpu'))}: copy bandwidth {bw / 1e12:.3f} TB/s "
          f"(read + write), torch {env['torch']}, triton {env['triton']}, peft {env['peft']}")
    rows = []
    if cuda:
        cases = [(o, i, r, torch.bfloat16, True) for o, i, r in SHAPES_GPU]
        if not args.quick:
            cases += [(8192, 8192, 16, torch.float16, False), (4096, 4096, 16, torch.float32, False),
                      (8192, 8192, 16, torch.float32, False)]
    else:
        cases = [(o, i, r, dt, True) for o, i, r in SHAPES_CPU for dt in (torch.float32, torch.bfloat16)]
    for o, i, r, dt, peers_too in cases:
        print(f"case {o}x{i} r={r} {dt}", flush=True)
        rows += bench_case(o, i, r, dt, device, bw, with_compile=not args.no_compile and
                           (o, i) in ((4096, 4096), (8192, 8192)), peers_too=peers_too)
    _print_table(rows)
    ema = bench_ema(device, bw)
    for row in ema:
        print(f"ema (64 q,v pairs, r=8): {row['variant']:>24} {row['ms'] * 1e3:8.1f} us "
              f"(floor {row['floor_ms'] * 1e3:.1f} us)")
    models = []
    if cuda and not args.no_models:
        for kind in ("llama2-7b-qv", "llama3-8b-all"):
            try:
                models.append(bench_model(kind, device, bw))
            except Exception as e:  # report and keep the rest of the run
                print(f"whole-model boundary {kind}: {type(e).__name__}: {e}")
                continue
            m = models[-1]
            print(f"whole-model boundary {kind}: {m['modules']} modules, {m['weight_gib']:.1f} GiB, "
                  f"planned {m['ms']:.2f} ms ({m['bw_frac']:.1%} of copy BW), one call with "
                  f"validation and planning {m['ms_one_call']:.2f} ms ({m['bw_frac_one_call']:.1%}), "
                  f"floor {m['floor_ms']:.2f} ms, extra {m['extra_mib']:.2f} MiB", flush=True)
    tag = "h200" if cuda and "H200" in env.get("gpu", "") else device.type
    with open(os.path.join(args.out, f"bench_{tag}.json"), "w") as f:
        json.dump(dict(environment=env, ops=rows, ema=ema, models=models), f, indent=1)
    with open(os.path.join(args.out, f"bench_{tag}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, os.path.join(args.out, f"bench_{tag}.png"))
    print(f"wrote {args.out}/bench_{tag}.json, .csv, .png")
    return 0
