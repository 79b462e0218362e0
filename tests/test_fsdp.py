"""LoRASC under FSDP2 (``fully_shard``) and DDP: 2 CPU processes (gloo) started here.

Every FSDP case trains a sharded tiny PEFT model with SGD and runs cascade boundaries with
noise (lambda = 1). Before each boundary a plain single-process copy of the model takes the
sharded model's trained fast factors (``full_tensor()``); after it, the base weights and fast
factors (``full_tensor()``) and each rank's slow shards must equal the single-process run
bit for bit in fp32. Then training goes on (forward/backward/step on the sharded model,
whose logits equal the single-process model's). The DDP case checks that every rank of a
replicated model ends with the same weights.

The bitwise cases use ``backend="reference"``, whose merge is row-invariant (one rounding of
an fp64 value). The CPU default, the torch path, is held to a few ulps: its BLAS products
group rows in eights, so a shard starting at a row that is not a multiple of 8 rounds some
rows differently, and its single-process std is taken from ``alpha * s + (1 - alpha) * f``
while the slow factors it stores are lerped (``ema_``), which can move the std by an ulp.
The GPU check (Triton kernels) is bench/fsdp_step.py.

The refusal cases shard only the second decoder block, so a boundary has plain and sharded
layers; the last (sharded) layer refuses - its EMA'd product overflows fp32, or one rank's
rows of its DoRA magnitude hold a NaN - and every rank must raise with nothing changed, then
run the boundary in step once repaired.

All cases run in one spawn of two processes (the start-up dominates); each rank writes its
checks to a JSON file that the tests below read.
"""
import copy
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorasc_fast import LoRASC, torch_path
from lorasc_fast.distributed import copy_full_, is_sharded, local, lowrank_moments

WORLD = 2
VOCAB = 128
CTRL = dict(alpha=0.8, noise_lambda=1.0, seed=1234)
EPS32 = torch.finfo(torch.float32).eps


def _llama(intermediate=128):
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _gpt2():  # n_embd 33: Conv1D weights with 33 stored rows, split 17 / 16
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=33, n_layer=2, n_head=3,
                                      n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def _case(builder, lora, *, backend="reference", before=False, blocks=True):
    """``before``: build the controller before ``fully_shard``; ``blocks``: also shard each
    decoder block (else the root only: after an eval forward its parameters stay unsharded)."""
    return dict(builder=builder, lora=lora, backend=backend, before=before, blocks=blocks)


QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
CASES = {
    "llama_qv": _case(_llama, dict(QV, init_lora_weights=False)),
    "llama_all_linear_uneven": _case(lambda: _llama(intermediate=129),
                                     dict(r=3, lora_alpha=6, target_modules="all-linear"),
                                     before=True, blocks=False),
    "gpt2_fan_in_fan_out": _case(_gpt2, dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                             target_modules=["c_attn", "c_proj", "c_fc"])),
    "llama_dora": _case(_llama, dict(QV, use_dora=True)),
    "llama_qv_torch_path": _case(_llama, dict(QV, init_lora_weights=False), backend=None),
}


def _build(builder, lora):
    torch.manual_seed(0)
    model = get_peft_model(builder(), LoraConfig(lora_dropout=0.0, **lora))
    return model.float()


def _blocks(model):
    inner = model.base_model.model
    return inner.model.layers if hasattr(inner, "model") else inner.transformer.h


def _batch(seed):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, ids, steps):
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _full(t):
    return t.full_tensor() if is_sharded(t) else t


@torch.no_grad()
def _sync_trainable(model, ref):
    """The plain copy takes the sharded model's trained parameters (LoRA, DoRA magnitudes)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            ref_params[name].copy_(_full(p))


def _slow_block(ref_layer, layer):
    """The reference's full slow factors cut to this rank's layout."""
    A, B, shard = ref_layer.A_slow, ref_layer.B_slow, layer.shard
    if shard is None:
        return A, B
    rows = slice(shard.offset, shard.offset + shard.rows)
    return (A[:, rows], B) if layer.module.fan_in_fan_out else (A, B[rows])


@torch.no_grad()
def _compare(ctrl, ref_ctrl):
    """Bitwise checks of every LoRA layer against the single-process controller."""
    w, close, fast, slow, sharded, diff = True, True, True, True, True, 0.0
    for layer, ref in zip(ctrl.layers, ref_ctrl.layers):
        W, W_ref = layer.module.get_base_layer().weight, ref.module.get_base_layer().weight
        full = _full(W)
        w &= torch.equal(full, W_ref)
        atol = 16 * EPS32 * float(W_ref.abs().max())
        close &= torch.allclose(full, W_ref, rtol=16 * EPS32, atol=atol)
        diff = max(diff, float((full - W_ref).abs().max()))
        sharded &= is_sharded(W) and layer.shard is not None
        for p, q in zip((layer.module.lora_A.default.weight, layer.module.lora_B.default.weight),
                        (ref.module.lora_A.default.weight, ref.module.lora_B.default.weight)):
            fast &= torch.equal(_full(p), q)
        A_ref, B_ref = _slow_block(ref, layer)
        slow &= torch.equal(layer.A_slow, A_ref) and torch.equal(layer.B_slow, B_ref)
    return dict(W=w, W_close=close, fast=fast, slow=slow, sharded=sharded, W_max_diff=diff)


def _fsdp_case(name):
    from torch.distributed.fsdp import fully_shard
    case = CASES[name]
    backend = case["backend"]
    model = _build(case["builder"], case["lora"])
    ref = copy.deepcopy(model)
    W0 = {n: p.detach().clone() for n, p in ref.named_parameters() if not p.requires_grad}
    ref_ctrl = LoRASC(ref, backend=backend, **CTRL)
    ctrl = LoRASC(model, backend=backend, **CTRL) if case["before"] else None
    for block in _blocks(model) if case["blocks"] else ():
        fully_shard(block)
    fully_shard(model)
    ctrl = ctrl or LoRASC(model, backend=backend, **CTRL)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _batch(0)  # the same batch on every rank: the sharded run trains like one process
    out = {"init_noise": ctrl.init_noise_applied == ref_ctrl.init_noise_applied}
    for cycle in range(2):
        _train(model, opt, ids, steps=2)
        _sync_trainable(model, ref)
        ctrl.step(opt)
        ref_ctrl.step()
        out[f"boundary{cycle + 1}"] = _compare(ctrl, ref_ctrl)
    _train(model, opt, ids, steps=1)
    _sync_trainable(model, ref)
    with torch.no_grad():  # eval forward: FSDP2 leaves the root unsharded; step must cope
        logits = model(input_ids=ids).logits
        out["logits_equal"] = torch.equal(logits, ref(input_ids=ids).logits)
    ctrl.step(opt)
    ref_ctrl.step()
    out["boundary_after_eval"] = _compare(ctrl, ref_ctrl)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out["trains_after"] = bool(torch.isfinite(loss)) and all(
        p.grad is not None for p in ctrl.fast_parameters())
    ctrl.finish()
    ref_ctrl.finish()
    out["finish"] = _compare(ctrl, ref_ctrl)
    out["W_changed"] = all(not torch.equal(_full(p), W0[n])
                           for n, p in model.named_parameters() if n.endswith("base_layer.weight"))
    return out


def _local_tensors(ctrl):
    """This rank's blocks of everything a boundary may write, layer by layer."""
    out = []
    for layer in ctrl.layers:
        m = layer.module
        out += [local(t) for t in (m.get_base_layer().weight, layer.A_slow, layer.B_slow,
                                   m.lora_A.default.weight, m.lora_B.default.weight)]
        if layer.dora:
            out.append(local(m.lora_magnitude_vector.default.weight))
    return out


@torch.no_grad()
def _set_fast(layer, rank, value):
    """Fast factors ``value * N(0, 1)``, the same full tensors on every rank (any ``rank``)."""
    g = torch.Generator().manual_seed(7)
    for p in (layer.module.lora_A.default.weight, layer.module.lora_B.default.weight):
        copy_full_(p, value * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _nan_magnitude(layer, rank, value):
    """``value`` in the first of rank 1's rows of the magnitude (rank 0's stay finite)."""
    if rank == 1:
        local(layer.module.lora_magnitude_vector.default.weight)[0] = value


def _refusal_case(rank, fault):
    from torch.distributed.fsdp import fully_shard
    inject, lora = {"overflow": (_set_fast, QV),
                    "nan_magnitude": (_nan_magnitude, dict(QV, use_dora=True))}[fault]
    model = _build(_llama, lora)
    fully_shard(_blocks(model)[1])  # block 0 stays plain
    ctrl = LoRASC(model, backend="reference", **CTRL)
    last = ctrl.layers[-1]
    out = {"mixed": [l.shard is not None for l in ctrl.layers] == [False, False, True, True]}
    for layer in ctrl.layers:  # trained-like fast factors
        _set_fast(layer, rank, 0.1)
    inject(last, rank, 1e30 if fault == "overflow" else float("nan"))
    before = [t.clone() for t in _local_tensors(ctrl)]
    W_last = local(last.module.get_base_layer().weight).clone()
    try:
        ctrl.step()
        out["raised"] = False
    except ValueError as e:
        out["raised"] = last.name in str(e) and "nothing was" in str(e)
    out["unchanged"] = all(torch.equal(a.nan_to_num(), b.nan_to_num()) and
                           torch.equal(a.isnan(), b.isnan())
                           for a, b in zip(before, _local_tensors(ctrl)))
    inject(last, rank, 0.1 if fault == "overflow" else 1.0)
    ctrl.step()
    out["repaired_steps"] = ctrl.boundaries == 1 and not torch.equal(
        local(last.module.get_base_layer().weight), W_last)
    return out


def _ddp_case(rank):
    """Replicated weights: each rank trains on its own batch (DDP averages the gradients)."""
    from torch.nn.parallel import DistributedDataParallel
    model = _build(_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ddp = DistributedDataParallel(model)
    ctrl = LoRASC(ddp, **CTRL)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    W0 = [layer.module.get_base_layer().weight.detach().clone() for layer in ctrl.layers]
    for _ in range(2):
        _train(ddp, opt, _batch(100 + rank), steps=2)
        ctrl.step(opt)
    tensors = [t for layer in ctrl.layers for t in (
        layer.module.get_base_layer().weight, layer.A_slow, layer.B_slow,
        layer.module.lora_A.default.weight)]
    same = True
    for t in tensors:
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.detach().contiguous())
        same &= all(torch.equal(g, gathered[0]) for g in gathered)
    changed = all(not torch.equal(layer.module.get_base_layer().weight, w)
                  for layer, w in zip(ctrl.layers, W0))
    return {"same_on_every_rank": same, "W_changed": changed,
            "plain_tensors": all(layer.shard is None for layer in ctrl.layers)}


@torch.no_grad()
def _moments_case(rank):
    """The distributed moments of uneven row shards: the same bits on every rank, equal to
    the single-process torch path's on the whole factors."""
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(16, 37, generator=g), torch.randn(101, 16, generator=g) * 0.1
    rows = torch.tensor_split(torch.arange(101), WORLD)[rank]  # 51 / 50 rows
    out = {}
    for row_factor, args in (("B", (A, B[rows])), ("A", (B[rows].T.contiguous(), A.T))):
        mean, std = lowrank_moments(*args, 0.5, row_factor=row_factor)
        stats = torch.stack([mean, std])
        gathered = [torch.empty_like(stats) for _ in range(WORLD)]
        dist.all_gather(gathered, stats)
        full = (A, B) if row_factor == "B" else (B.T, A.T)
        single = torch.stack(torch_path.lowrank_moments(*full, 0.5))
        out[row_factor] = {"same_on_every_rank": all(torch.equal(x, stats) for x in gathered),
                           "equals_single_process": torch.equal(stats, single)}
    return out


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {name: _fsdp_case(name) for name in CASES}
        results["refusal"] = {f: _refusal_case(rank, f) for f in ("overflow", "nan_magnitude")}
        results["ddp"] = _ddp_case(rank)
        results["moments"] = _moments_case(rank)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()  # gloo aborts if a rank tears down while its peer is still receiving
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: a thread that gloo leaves joinable after
    # destroy_process_group sometimes aborts the exit ("terminate called without an active
    # exception"), after all the work is done and written.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch without torch.distributed")
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    ranks = []
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def _assert_equal_to_single_process(case, bitwise):
    assert case["init_noise"]
    for key in ("boundary1", "boundary2", "boundary_after_eval", "finish"):
        checks = case[key]
        assert checks["sharded"], f"{key}: the base weights are not sharded DTensors"
        assert checks["W" if bitwise else "W_close"], (
            f"{key}: base weights differ (max |diff| {checks['W_max_diff']})")
        assert checks["fast"], f"{key}: re-initialised fast factors differ"
        assert checks["slow"], f"{key}: slow factor shards differ"
    assert case["logits_equal"] or not bitwise
    assert case["trains_after"]
    assert case["W_changed"]


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_matches_single_process(results, name):
    for rank, res in enumerate(results):
        print(f"rank {rank}: {res[name]}")
        _assert_equal_to_single_process(res[name], bitwise=CASES[name]["backend"] == "reference")


@pytest.mark.parametrize("fault", ["overflow", "nan_magnitude"])
def test_refused_boundary_changes_nothing_on_any_rank(results, fault):
    for rank, res in enumerate(results):
        assert res["refusal"][fault] == {"mixed": True, "raised": True, "unchanged": True,
                                         "repaired_steps": True}, f"rank {rank}"


def test_ddp_every_rank_same(results):
    for res in results:
        assert res["ddp"] == {"same_on_every_rank": True, "W_changed": True,
                              "plain_tensors": True}


def test_moments_of_row_shards(results):
    for res in results:
        for row_factor in ("A", "B"):
            assert res["moments"][row_factor] == {"same_on_every_rank": True,
                                                  "equals_single_process": True}, row_factor


def test_fsdp_step_benchmark_runs(tmp_path):
    """``bench/fsdp_step.py`` (the GPU check, run by hand on two GPUs) on two CPU processes:
    the sharded boundary equals the single-process one and the sharded algorithm on whole
    matrices, and the model trains after it. It once imported an op the distributed module no
    longer had, which only a run on GPUs found (rank 0 died, rank 1 waited in a collective)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "fsdp_step.py")
    out = tmp_path / "fsdp_step.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           script, "--device", "cpu", "--hidden", "64", "--layers", "1", "--iters", "1",
           "--warmup", "0", "--check-boundaries", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for name, res in json.loads(out.read_text())["results"].items():
        assert res["equal_single_gpu"] and res["equal_same_math"] and res["trains_after"], name
