"""Peak memory of ``lorasc merge`` against PEFT's ``merge_and_unload`` + ``save_pretrained``.

Builds a synthetic Llama-like checkpoint (>= 2 GB of fp32 weights, sharded, from a
``LlamaConfig``; random weights) and a rank-16 LoRA adapter on all its linear layers in a
temporary directory, then runs, each in its own child process:

* ``baseline_lorasc`` / ``baseline_peft``: the interpreter importing what each side imports
  and nothing else (the floors);
* ``lorasc``: ``python -m lorasc_fast.cli merge BASE ADAPTER OUT --device cpu``;
* ``peft``: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload()`` +
  ``save_pretrained`` (same shard size as BASE).

Peak RSS of each child comes from ``os.wait4`` (the child's own ``ru_maxrss``). The two
outputs are compared tensor by tensor. Results go to ``bench/results/merge_memory.json``.

    python bench/merge_memory.py [--layers 8] [--hidden 2048] [--workdir DIR] [--keep]

CPU only; needs ~3x the checkpoint size of free disk and ~2x of free RAM (for PEFT's side).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "merge_memory.json"

BUILD = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**spec["config"]))
model.save_pretrained(spec["base"], max_shard_size=spec["shard"])
pm = get_peft_model(model, LoraConfig(**spec["lora"]))
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # B = 0 at init: give the adapter something to merge
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
pm.save_pretrained(spec["adapter"])
"""

PEFT_MERGE = """
import sys, torch
from transformers import LlamaForCausalLM
from peft import PeftModel
base, adapter, out, shard = sys.argv[1:5]
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size=shard)
"""

BASELINES = {
    "baseline_lorasc": "import lorasc_fast.cli, lorasc_fast.checkpoint_merge",
    "baseline_peft": "import torch, peft; from transformers import LlamaForCausalLM",
}


def run_measured(label: str, argv: list[str], log_dir: Path) -> dict:
    """Run argv as a child; its exit code, wall time and peak RSS (bytes) via wait4."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = log_dir / f"{label}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"{label} failed with exit code {proc.returncode}")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    print(f"{label:>15}: peak RSS {peak / 2**20:8.1f} MiB, {wall:6.1f} s", flush=True)
    return {"peak_rss_bytes": peak, "peak_rss_mib": round(peak / 2**20, 1),
            "wall_s": round(wall, 2)}


def checkpoint_stats(base: Path, adapter: Path) -> dict:
    from lorasc_fast.checkpoint_base import open_base
    ckpt = open_base(base)
    infos = [h.tensors[n] for h in ckpt.shards.values() for n in h.tensors]
    return {
        "weights_bytes": sum(i.nbytes for i in infos),
        "files_bytes": sum((base / rel).stat().st_size for rel in ckpt.shards),
        "shards": len(ckpt.shards),
        "tensors": len(infos),
        "largest_tensor_bytes": max(i.nbytes for i in infos),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
    }


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor (memory-mapped, one tensor pair at a time)."""
    from safetensors import safe_open
    index = json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"]
    other = json.loads((theirs / "model.safetensors.index.json").read_text())["weight_map"]
    assert index.keys() == other.keys(), "different tensor names"
    max_abs, differing, total = 0.0, 0, 0
    for name in sorted(index):
        with safe_open(ours / index[name], "pt") as a, safe_open(theirs / other[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.is_floating_point():
            max_abs = max(max_abs, (x.double() - y.double()).abs().max().item())
        differing += int((x != y).sum())
        total += x.numel()
    return {"tensors": len(index), "max_abs_diff": max_abs,
            "fraction_elements_identical": 1 - differing / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard", default="500MB", help="max_shard_size of BASE and of PEFT's output")
    ap.add_argument("--block-mib", type=int, default=64, help="lorasc merge --block-mib")
    ap.add_argument("--workdir", help="where to build (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorasc-merge-bench-", dir=args.workdir))
    base, adapter = work / "base", work / "adapter"
    ours, theirs = work / "merged-lorasc", work / "merged-peft"
    spec = {
        "base": str(base), "adapter": str(adapter), "shard": args.shard,
        "config": dict(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=16, num_key_value_heads=16,
                       tie_word_embeddings=False, torch_dtype="float32"),
        "lora": dict(r=args.rank, lora_alpha=2 * args.rank,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                     "gate_proj", "up_proj", "down_proj"]),
    }
    py = sys.executable
    try:
        result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform()}}
        result["build"] = run_measured("build", [py, "-c", BUILD, json.dumps(spec)], work)
        result["checkpoint"] = {**checkpoint_stats(base, adapter), "config": spec["config"],
                                "lora": spec["lora"], "dtype": "float32", "shard": args.shard}
        ck = result["checkpoint"]
        print(f"checkpoint: {ck['weights_bytes'] / 2**30:.2f} GiB in {ck['shards']} shards, "
              f"largest tensor {ck['largest_tensor_bytes'] / 2**20:.0f} MiB, "
              f"adapter {ck['adapter_bytes'] / 2**20:.1f} MiB", flush=True)
        for label, code in BASELINES.items():
            result[label] = run_measured(label, [py, "-c", code], work)
        result["lorasc"] = run_measured("lorasc", [
            py, "-m", "lorasc_fast.cli", "merge", str(base), str(adapter), str(ours),
            "--device", "cpu", "--no-progress", "--block-mib", str(args.block_mib)], work)
        result["lorasc"]["block_mib"] = args.block_mib
        result["peft"] = run_measured("peft", [py, "-c", PEFT_MERGE, str(base), str(adapter),
                                               str(theirs), args.shard], work)
        result["outputs_compared"] = compare(ours, theirs)
        above = {side: round((result[side]["peak_rss_bytes"]
                              - result[f"baseline_{side}"]["peak_rss_bytes"]) / 2**20, 1)
                 for side in ("lorasc", "peft")}
        result["summary"] = {
            "lorasc_peak_mib": result["lorasc"]["peak_rss_mib"],
            "peft_peak_mib": result["peft"]["peak_rss_mib"],
            "lorasc_peak_above_its_imports_mib": above["lorasc"],
            "peft_peak_above_its_imports_mib": above["peft"],
            "spec_bound_largest_tensor_plus_adapter_mib": round(
                (ck["largest_tensor_bytes"] + ck["adapter_bytes"]) / 2**20, 1),
            "peft_over_lorasc_peak": round(result["peft"]["peak_rss_bytes"]
                                           / result["lorasc"]["peak_rss_bytes"], 2),
        }
        print(json.dumps(result["summary"], indent=2))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
