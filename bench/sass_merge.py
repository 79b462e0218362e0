"""Instructions per element of the fused merge's main loop, from its sm_90 machine code.

Compiles ``kernels/merge.py::merge_kernel`` for the H100/H200 (``GPUTarget("cuda", 90, 32)``)
with Triton's bundled ``ptxas``: no GPU needed. The loop body is the code between the
pipelined loop's label and its backward branch; each thread runs it once per W tile, on
``BLOCK_M * BLOCK_N / (32 * num_warps)`` elements. Prints instructions per element by
opcode class, for the default configuration of each mode (or ``--block``), and for the
grouped whole-model kernel (``cascade_group.merge_group_kernel``) with noise.

    python bench/sass_merge.py [--r 16] [--block 16x256x4x4] [--sass-out DIR]

The H200 issues 4 instructions per SM per cycle: at 1.98 GHz over 132 SMs and 32 lanes,
``n`` instructions per element of an 8192 x 8192 W cannot take less than
``n * 8192**2 / (4 * 32 * 132 * 1.98e9)`` seconds (``n = 21.3``, merge + noise at 64 x 128
tiles: 43 us; the copy floor is 63 us).
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, also on a CPU-only machine

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lorasc_fast import triton_path  # noqa: E402
from lorasc_fast.kernels import cascade_group, merge  # noqa: E402

CLASSES = [  # (name, opcode prefixes); the first match counts
    ("philox mul", ("IMAD.HI", "IMAD.WIDE")),
    ("integer logic/shift", ("LOP3", "SHF", "PRMT", "SEL", "LEA", "IADD3", "VIADD", "IMAD", "MOV")),
    ("fp32 add/mul/fma", ("FADD", "FMUL", "FFMA")),
    ("NaN guard / compare", ("FSETP", "FSEL", "ISETP")),
    ("tensor core", ("HMMA", "HGMMA", "WARPGROUP")),
    ("shared memory", ("LDS", "STS", "LDSM", "LDGSTS", "BAR")),
    ("global memory", ("LDG", "STG")),
    ("conversion", ("F2FP", "F2F", "I2F", "F2I")),
    ("uniform datapath", ("U", "S2UR", "R2UR")),
]


def compile_sm90(fn, types: dict, const: dict, aligned, warps: int, stages: int):
    """``fn`` compiled for sm_90: ``types`` maps runtime arguments to Triton types (default
    i32), ``const`` the constexprs, ``aligned`` the arguments declared 16-divisible (what
    Triton's launcher infers from a real call)."""
    names = list(fn.arg_names)
    sig = {n: types.get(n, "i32") for n in names}
    sig.update({k: "constexpr" for k in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_merge(r, block_m, block_n, warps, stages, *, noise, stochastic, w_kind=3, ones=()):
    """``merge_kernel`` as ``launch_merge`` calls it on an aligned, tile-divisible W; the
    integer arguments named in ``ones`` equal 1 (Triton makes such arguments constants)."""
    types = dict(W={3: "*bf16", 1: "*fp16", 0: "*fp32"}[w_kind], X="*fp32", Y="*fp32",
                 FLAG="*i32", scale="fp32", noise_scaled="fp32")
    const = dict(stride_wn=1, stride_xk=1, stride_yn=1, R=r, R_PAD=max(16, triton.next_power_of_2(r)),
                 HAS_DELTA=True, HAS_NOISE=noise, STOCHASTIC=stochastic, W_KIND=w_kind,
                 ALIGNED8=True, EVEN=True, HAS_FLAG=False, BLOCK_M=block_m, BLOCK_N=block_n,
                 NUM_STAGES=stages, **{name: 1 for name in ones})
    aligned = [a for a in ("W", "X", "Y", "FLAG", "M", "N", "stride_wm", "stride_xm", "stride_yk")
               if a not in ones]
    return compile_sm90(merge.merge_kernel, types, const, aligned, warps, stages)


def compile_group_merge(r, block_m, block_n, warps, stages, *, noise, layers=64):
    """``cascade_group.merge_group_kernel`` for bf16 W on aligned rows (``ALIGNED16``)."""
    types = dict(LAYERS="*i64", OFFSETS="*i32", SCALES="*fp32", STD="*fp32", SEEDS="*i64",
                 FLAG="*i32", noise_lambda_scaled="fp32")
    const = dict(NF=len(cascade_group.MERGE_FIELDS), L_PAD=triton.next_power_of_2(layers),
                 R_PAD=max(16, triton.next_power_of_2(r)), HAS_NOISE=noise, STOCHASTIC=False,
                 W_KIND=3, X_KIND=0, Y_KIND=0, ALIGNED8=True, FAN_IN_FAN_OUT=False,
                 ALIGNED16=True, EVEN=True, FULL_RANK=r == max(16, triton.next_power_of_2(r)),
                 BLOCK_M=block_m, BLOCK_N=block_n,
                 NUM_STAGES=stages)
    aligned = ["LAYERS", "OFFSETS", "SCALES", "STD", "SEEDS", "FLAG"]
    return compile_sm90(cascade_group.merge_group_kernel, types, const, aligned, warps, stages)


def disassemble(cubin: bytes) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_body(sass: str) -> list[str]:
    """Opcodes of the longest loop (label .. backward branch)."""
    labels, pending, ins = {}, None, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            pending = int(m.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            if pending is not None:
                labels[pending], pending = addr, None
            ins.append((addr, re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).split()[0]))
    loops = [(labels[label], addr) for addr, label in _branches(sass)
             if labels.get(label, addr) < addr]
    lo, hi = max(loops, key=lambda ab: ab[1] - ab[0])
    return [op for a, op in ins if lo <= a <= hi]


def _branches(sass):
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/[^;\n]*BRA\s+`\(\.L_x_(\d+)\)", sass):
        yield int(m.group(1), 16), int(m.group(2))


def classify(ops):
    counts = collections.Counter()
    for op in ops:
        name = next((n for n, prefixes in CLASSES if op.startswith(prefixes)), "other")
        counts[name] += 1
    return counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--block", help="BLOCK_MxBLOCK_NxWARPSxSTAGES (default: merge_config's)")
    p.add_argument("--sass-out", help="write each mode's SASS into this folder")
    args = p.parse_args()
    if args.block:
        bm, bn, warps, stages = map(int, args.block.split("x"))
    else:
        cfg = triton_path.merge_config(8192, 8192, args.r, _Cuda())
        bm, bn, warps, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["NUM_STAGES"]
    per_thread = bm * bn // (32 * warps)
    print(f"r = {args.r}, tile {bm}x{bn}, {warps} warps, {stages} stages: {per_thread} elements "
          "per thread per loop iteration")
    rows = {}
    variants = {
        "merge": lambda: compile_merge(args.r, bm, bn, warps, stages, noise=False,
                                       stochastic=False),
        "merge+noise": lambda: compile_merge(args.r, bm, bn, warps, stages, noise=True,
                                             stochastic=False),
        "merge+noise+SR": lambda: compile_merge(args.r, bm, bn, warps, stages, noise=True,
                                                stochastic=True),
        "grouped+noise": lambda: compile_group_merge(args.r, bm, bn, warps, stages, noise=True),
    }
    for mode, build in variants.items():
        k = build()
        sass = disassemble(k.asm["cubin"])
        if args.sass_out:
            os.makedirs(args.sass_out, exist_ok=True)
            with open(os.path.join(args.sass_out, f"merge_r{args.r}_{mode}.sass"), "w") as f:
                f.write(sass)
        ops = loop_body(sass)
        rows[mode] = classify(ops)
        print(f"{mode:16s} {len(ops) / per_thread:5.1f} instructions per element "
              f"({len(ops)} per iteration), {k.metadata.shared} B shared memory")
    names = [n for n, _ in CLASSES] + ["other"]
    print(f"\n{'per element':22s}" + "".join(f"{m:>16s}" for m in rows))
    for n in names:
        print(f"{n:22s}" + "".join(f"{rows[m][n] / per_thread:16.2f}" for m in rows))


class _Cuda:
    type = "cuda"


if __name__ == "__main__":
    main()
