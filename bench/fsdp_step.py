"""A LoRASC boundary on an FSDP2-sharded model against the same boundary on one GPU.

    torchrun --nproc_per_node 2 bench/fsdp_step.py --out bench/results/fsdp_step.json

Model: ``--layers`` blocks of ``q_proj``, ``v_proj`` = ``nn.Linear(hidden, hidden)`` (default
8 x 4096^2) with LoRA rank ``--rank`` on both (PEFT ``inject_adapter_in_model``), in each
``--dtypes`` entry (bf16 merges with stochastic rounding). Every rank builds the same model
from the same seeds; rank 0 keeps an unsharded copy on its GPU (the single-GPU run). The
sharded model: ``fully_shard`` per block and on the root, a 1-D mesh over all ranks.

Checks, over ``--check-boundaries`` boundaries, each after giving both models the same
random "trained" fast factors:

* ``equal_single_gpu``: every sharded W (``full_tensor()``, gathered for the check only)
  equals the single-GPU ``LoRASC.step`` bit for bit (else: differing elements, max |diff|).
  The sharded std comes from fp64 all-reduced Grams, the single-GPU Triton std from fp32
  partial Grams, so the two stds may differ in the last fp32 bit, and with them the noise;
* ``equal_same_math``: equals a single-GPU run of the sharded algorithm on whole matrices
  (``distributed.cascade_merge_`` with one shard of all rows: same fp64 std): isolates the
  sharding (row offsets, layouts) from the std's rounding;
* ``trains_after``: a forward/backward of the sharded model after the boundaries.

Timing: ``--iters`` boundaries after ``--warmup``, CUDA-synchronised and fenced by barriers;
sharded = slowest rank. Prints a table (rank 0) and writes JSON to ``--out``.

``--trainer`` instead checks the transformers ``Trainer`` path: a tiny Llama with LoRA trained
by ``Trainer(fsdp=True, fsdp_config={"version": 2})`` (accelerate applies ``fully_shard``)
with ``LoRASCCallback(every=2)``; reports whether the base weights were sharded DTensors, the
boundaries run, the final merge, and the loss.

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``). A CPU smoke test:
``torchrun --nproc_per_node 2 bench/fsdp_step.py --device cpu --hidden 128 --layers 2``.
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER = "default"


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return x + self.q_proj(x) + self.v_proj(x)


class Stack(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--noise-lambda", type=float, default=1.0)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-boundaries", type=int, default=2)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="bench/results/fsdp_step.json")
    p.add_argument("--trainer", action="store_true", help="check Trainer + FSDP2 instead")
    return p.parse_args()


def build(args, dtype, device):
    """The same model on every rank, from a seeded generator: W and LoRA A ~ N(0, 0.02^2),
    B = 0 (as after PEFT's init: no step-0 noise)."""
    from peft import LoraConfig, inject_adapter_in_model
    torch.manual_seed(0)
    with torch.device(device):
        model = Stack(args.hidden, args.layers)
    model = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                               target_modules=["q_proj", "v_proj"]), model)
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" not in name:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    return model.to(dtype)


def fast_values(ctrl, boundary: int, device):
    """Identical "trained" fast factors on every rank (CPU generator, then the device)."""
    g = torch.Generator().manual_seed(1000 + boundary)
    return [(torch.randn(A.shape, generator=g) * 0.02, torch.randn(B.shape, generator=g) * 0.01)
            for A, B in zip(ctrl.fast_parameters()[0::2], ctrl.fast_parameters()[1::2])]


@torch.no_grad()
def set_fast(ctrl, values, device):
    from lorasc_fast.distributed import copy_full_
    params = ctrl.fast_parameters()
    for (A, B), A_f, B_f in zip(values, params[0::2], params[1::2]):
        copy_full_(A_f, A.to(device))
        copy_full_(B_f, B.to(device))


class SameMath:
    """The sharded algorithm on whole matrices on one GPU: one shard holding every row."""

    def __init__(self, ctrl):
        from lorasc_fast.distributed import RowShard
        self.ctrl = ctrl
        self.layers = []
        for layer in ctrl.layers:
            W = layer.module.get_base_layer().weight.detach().clone()
            shard = RowShard(offset=0, rows=W.shape[0], global_rows=W.shape[0], mesh=None,
                             placements=(), row_dims=())
            self.layers.append((W, layer.A_slow.clone(), layer.B_slow.clone(), shard,
                                layer.module.scaling[ADAPTER]))

    def step(self, values, boundary: int, device):
        from lorasc_fast.cascade import NOISE, stream_seed
        from lorasc_fast.distributed import commit_merge_, stage_merge
        c = self.ctrl
        for i, ((W, A_s, B_s, shard, scale), (A, B)) in enumerate(zip(self.layers, values)):
            staged = stage_merge(W, A_s, B_s, A.to(device, W.dtype), B.to(device, W.dtype),
                                 shard=shard, alpha=c.alpha, scale=scale,
                                 seed=stream_seed(c.seed, boundary, i, NOISE),
                                 rounding=c.rounding, fan_in_fan_out=False)
            commit_merge_(staged, c.noise_lambda * float(staged.std))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, warmup: int, device, run_here: bool) -> list[float]:
    """Milliseconds per call on this rank (empty where ``run_here`` is False)."""
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        if run_here:
            fn()
        sync(device)
        if i >= warmup and run_here:
            times.append((time.perf_counter() - t0) * 1e3)
    dist.barrier()
    return times


def slowest(times: list[float], device) -> list[float]:
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def run_dtype(args, dtype, device, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lorasc_fast import LoRASC
    rounding = "nearest" if dtype == torch.float32 else "stochastic"
    kw = dict(alpha=args.alpha, noise_lambda=args.noise_lambda, seed=7, rounding=rounding)
    model = build(args, dtype, device)
    ref = copy.deepcopy(model) if rank == 0 else None
    mesh = init_device_mesh(device.type, (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ctrl = LoRASC(model, **kw)
    ref_ctrl = LoRASC(ref, **kw) if rank == 0 else None
    same = SameMath(ref_ctrl) if rank == 0 else None

    out = {"equal_single_gpu": True, "equal_same_math": True, "diff_elems_single_gpu": 0,
           "max_abs_diff_single_gpu": 0.0}
    for boundary in range(1, args.check_boundaries + 1):
        values = fast_values(ctrl, boundary, device)
        set_fast(ctrl, values, device)
        ctrl.step()
        if rank == 0:
            set_fast(ref_ctrl, values, device)
            ref_ctrl.step()
            same.step(values, boundary, device)
        for i, layer in enumerate(ctrl.layers):
            full = layer.module.get_base_layer().weight.full_tensor()  # for the check only
            if rank != 0:
                continue
            W_ref = ref_ctrl.layers[i].module.get_base_layer().weight
            out["equal_single_gpu"] &= torch.equal(full, W_ref)
            out["equal_same_math"] &= torch.equal(full, same.layers[i][0])
            out["diff_elems_single_gpu"] += int((full != W_ref).sum())
            out["max_abs_diff_single_gpu"] = max(out["max_abs_diff_single_gpu"],
                                                 float((full.float() - W_ref.float()).abs().max()))
            del full

    x = torch.randn(4, args.hidden, device=device, dtype=dtype)
    model(x).float().pow(2).mean().backward()
    out["trains_after"] = all(
        p.grad is not None and bool(torch.isfinite(p.grad.full_tensor()).all())
        for p in ctrl.fast_parameters())
    for p in model.parameters():
        p.grad = None

    sharded = slowest(timed(ctrl.step, args.iters, args.warmup, device, True), device)
    single = timed(ref_ctrl.step if rank == 0 else None, args.iters, args.warmup, device, rank == 0)
    if rank == 0:
        out.update(
            sharded_ms_median=statistics.median(sharded), sharded_ms_min=min(sharded),
            single_ms_median=statistics.median(single), single_ms_min=min(single),
            W_bytes_per_rank_sharded=sum(layer.module.get_base_layer().weight.to_local().nbytes
                                         for layer in ctrl.layers),
            W_bytes_single=sum(layer.module.get_base_layer().weight.nbytes
                               for layer in ref_ctrl.layers))
    del model, ref, ctrl, ref_ctrl, same
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def trainer_check(device) -> dict:
    """Trainer + accelerate FSDP2 + LoRASCCallback on a tiny Llama (6 steps, every=2)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from lorasc_fast import LoRASCCallback
    from lorasc_fast.distributed import is_sharded
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    callback = LoRASCCallback(every=2, noise_lambda=1.0)
    args = TrainingArguments(
        output_dir="/tmp/lorasc_fsdp_trainer", per_device_train_batch_size=2, max_steps=6,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=device.type == "cpu", fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    result = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback]).train()
    cascade = callback.cascade
    return {"sharded": all(is_sharded(layer.module.get_base_layer().weight) and
                           layer.shard is not None for layer in cascade.layers),
            "boundaries": cascade.boundaries, "finished": cascade.finished,
            "train_loss": result.training_loss}


def main():
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    try:
        if args.trainer:
            results["trainer_fsdp2"] = trainer_check(device)
        else:
            for name in args.dtypes.split(","):
                results[name] = run_dtype(args, DTYPES[name], device, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return
    report = {"world_size": world, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    if args.trainer:
        print("\nTrainer + FSDP2 + LoRASCCallback:", results["trainer_fsdp2"])
        write(report, args.out)
        return
    print(f"\nLoRASC boundary, {args.layers} x 2 LoRA layers of {args.hidden}^2, r={args.rank}, "
          f"{world} ranks ({report['device']})")
    print(f"{'dtype':>9} | {'1 GPU ms':>9} | {f'{world} ranks ms':>11} | {'speedup':>7} | "
          f"{'= 1 GPU':>7} | {'= same math':>11} | {'diff elems':>10} | {'max|diff|':>9} | trains")
    for name, r in results.items():
        print(f"{name:>9} | {r['single_ms_median']:9.2f} | {r['sharded_ms_median']:11.2f} | "
              f"{r['single_ms_median'] / r['sharded_ms_median']:7.2f} | "
              f"{str(r['equal_single_gpu']):>7} | {str(r['equal_same_math']):>11} | "
              f"{r['diff_elems_single_gpu']:10d} | {r['max_abs_diff_single_gpu']:9.2e} | "
              f"{r['trains_after']}")
    write(report, args.out)


def write(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
