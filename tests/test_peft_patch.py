"""patch_peft(): PEFT LoRA Linear merge/unmerge/get_delta_weight on the fused ops.

Every model is built twice from the same seed, once merged by PEFT's own code and once
with the patch, and the merged weights and outputs are compared: tiny Llama (Linear),
GPT-2 (Conv1D, fan_in_fan_out) and BERT (biases) with LoRA, rsLoRA, DoRA, lora_bias
and two adapters.
"""
import os
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from lorasc_fast import dora, peft_patch, triton_path
from lorasc_fast.validation import NonFiniteError
from helpers import DEVICE, assert_ulps, run_probe, snapshot, tiny_llama, unchanged

METHODS = ("merge", "unmerge", "get_delta_weight")
ORIGINAL = {name: Linear.__dict__[name] for name in METHODS}

MODELS = {
    "llama": (tiny_llama,
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
        ["c_attn", "c_proj", "c_fc"]),
    "bert": (lambda: BertModel(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32)),
        ["query", "key", "value", "dense"]),
}
IDS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 12, 0, 3]])


@pytest.fixture
def unpatched():
    """Every test starts and ends with PEFT's own methods."""
    peft_patch.unpatch_peft()
    yield
    peft_patch.unpatch_peft()
    assert all(Linear.__dict__[name] is ORIGINAL[name] for name in METHODS)


def build(kind, adapters=({},), dtype=torch.float32):
    """A tiny model with LoRA adapters "a0", "a1", ... (all active), random factors and,
    for DoRA, magnitudes that differ from the initial norms."""
    make, targets = MODELS[kind]
    torch.manual_seed(0)
    model = make().to(dtype=dtype, device=DEVICE)
    peft_model = None
    for i, extra in enumerate(adapters):
        config = LoraConfig(r=4 + 2 * i, lora_alpha=8 + i, target_modules=targets,
                            init_lora_weights=False, fan_in_fan_out=kind == "gpt2", **extra)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name="a0")
        else:
            peft_model.add_adapter(f"a{i}", config)
    peft_model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.5 * torch.rand(p.shape, generator=g).to(p))
            elif "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g).to(p))
    return peft_model.eval()


def output(model):
    with torch.no_grad():
        out = model(input_ids=IDS.to(DEVICE))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def base_weights(peft_model):
    return {name: p.detach().clone() for name, p in peft_model.named_parameters()
            if "lora_" not in name}


def assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        if expected[name].dtype == torch.float32:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert_ulps(got[name], expected[name], 1)


CASES = [
    ("llama", ({},)),
    ("llama", ({"use_rslora": True}, {})),
    ("llama", ({"use_dora": True},)),
    ("llama", ({"use_dora": True}, {"use_dora": True})),  # DoRA norm from the unmerged base
    ("llama", ({}, {"use_dora": True})),
    ("gpt2", ({},)),
    ("gpt2", ({"use_dora": True}, {})),
    ("gpt2", ({"lora_bias": True},)),
    ("bert", ({"lora_bias": True}, {"use_rslora": True})),
    ("bert", ({"use_dora": True},)),
]


@pytest.mark.parametrize("kind,adapters", CASES)
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_round_trip_and_unload_match_peft(unpatched, kind, adapters, safe_merge):
    results = []
    for patched in (False, True):
        if patched:
            peft_patch.patch_peft()
        model = build(kind, adapters)
        before, y0 = base_weights(model), output(model)
        model.merge_adapter(safe_merge=safe_merge)
        merged, y_merged = base_weights(model), output(model)
        model.unmerge_adapter()
        restored = base_weights(model)
        unloaded = model.merge_and_unload(safe_merge=safe_merge)
        results.append((merged, restored, {n: p.detach() for n, p in unloaded.named_parameters()},
                        y_merged, output(unloaded)))
        peft_patch.unpatch_peft()
        # the patched run on its own: merging changes the weights but not the function
        assert any(not torch.equal(merged[n], before[n]) for n in before)
        torch.testing.assert_close(y_merged, y0, rtol=1e-4, atol=1e-4)
        assert_same_weights(restored, before)
    for peft_result, ours in zip(*results):
        if isinstance(ours, dict):
            assert_same_weights(ours, peft_result)
        else:
            torch.testing.assert_close(ours, peft_result, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,adapters", [("llama", ({"use_dora": True},)), ("gpt2", ({},)),
                                           ("gpt2", ({"use_dora": True},)),
                                           ("bert", ({"lora_bias": True},))])
def test_bf16_model_within_one_ulp_of_peft(unpatched, kind, adapters):
    """One adapter is one rounding to bf16 (fp32 adapters, PEFT's default autocast), so
    the two merges differ by at most one ulp; each further merge step may add one."""
    merged = []
    for patched in (False, True):
        if patched:
            peft_patch.patch_peft()
        model = build(kind, adapters, dtype=torch.bfloat16)
        model.merge_adapter()
        merged.append(base_weights(model))
        peft_patch.unpatch_peft()
    assert_same_weights(merged[1], merged[0])


def test_merge_one_adapter_then_another(unpatched):
    """Merging adapters in separate calls and unmerging: PEFT's bookkeeping and weights."""
    states = []
    for patched in (False, True):
        if patched:
            peft_patch.patch_peft()
        model = build("llama", ({"use_dora": True}, {}, {"use_dora": True}))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.merge(adapter_names=["a1"])
        with pytest.warns(UserWarning, match="Already following adapters were merged a1"):
            layer.merge(adapter_names=["a0", "a2"])
        with pytest.warns(UserWarning, match="already merged"):
            layer.merge(adapter_names=["a0"])
        assert layer.merged_adapters == ["a1", "a0", "a2"]
        assert {"a0-weight_norm", "a2-weight_norm"} <= set(layer._caches)
        merged = layer.base_layer.weight.detach().clone()
        layer.unmerge()
        assert layer.merged_adapters == [] and not any("weight_norm" in k for k in layer._caches)
        with pytest.warns(UserWarning, match="Already unmerged"):
            layer.unmerge()
        states.append((merged, layer.base_layer.weight.detach().clone()))
        peft_patch.unpatch_peft()
    torch.testing.assert_close(states[1][0], states[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[1][1], states[0][1], rtol=1e-5, atol=1e-5)


def _poison(model, kind, what):
    layer = model.base_model.model.model.layers[1].mlp.up_proj if kind == "llama" else \
        model.base_model.model.transformer.h[1].mlp.c_fc
    with torch.no_grad():
        if what == "magnitude":
            layer.lora_magnitude_vector["a0"].weight[2] = float("inf")
        elif what == "zero_norm":  # output feature 2 of W + s B A is zero: dora_factor = m / 0
            W = layer.base_layer.weight
            (W[:, 2] if kind == "gpt2" else W[2]).zero_()
            layer.lora_B["a0"].weight[2] = 0.0
        else:
            layer.lora_B["a0"].weight[3, 1] = float("nan")
    return layer


@pytest.mark.parametrize("kind,adapters,what", [
    ("llama", ({},), "lora_B"), ("gpt2", ({"use_dora": True},), "lora_B"),
    ("llama", ({"use_dora": True},), "magnitude"), ("gpt2", ({"use_dora": True},), "zero_norm")])
def test_safe_merge_refuses_non_finite_and_leaves_layer_unchanged(unpatched, kind, adapters, what):
    peft_patch.patch_peft()
    model = build(kind, adapters)
    layer = _poison(model, kind, what)
    before = snapshot(layer.base_layer.weight)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter a0") \
            as refused:
        model.merge_adapter(safe_merge=True)
    assert isinstance(refused.value.__cause__, NonFiniteError)  # which input, in its message
    assert unchanged(before, layer.base_layer.weight)
    assert layer.merged_adapters == []


def test_safe_merge_refuses_overflow_with_finite_factors(unpatched):
    """fp16 W + delta overflows: the read-only dry run catches it before any write."""
    peft_patch.patch_peft()
    model = build("llama", ({},), dtype=torch.float16)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["a0"].weight.fill_(300.0)
        layer.lora_A["a0"].weight.fill_(100.0)
    before = snapshot(layer.base_layer.weight)
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert unchanged(before, layer.base_layer.weight) and layer.merged_adapters == []


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dry_run_reads_every_chunk(gen, fifo, dtype):
    """The safe merge's read-only pass (``torch_path.merged_finite``) over W's row chunks:
    ``post * (W + s B A)`` rounded to W's dtype, non-finite in the last chunk only."""
    from lorasc_fast import torch_path
    out_f, in_f = 70, 44
    W = torch.randn((in_f, out_f) if fifo else (out_f, in_f), generator=gen).to(dtype)
    A, B = torch.randn(3, in_f, generator=gen), 0.01 * torch.randn(out_f, 3, generator=gen)
    assert torch_path.chunk_rows(W, words=False) * 4 < W.shape[0]
    W[-1, -1] = torch.finfo(dtype).max  # output feature out_f - 1 in both layouts
    post = torch.ones(out_f)
    before = snapshot(W)

    def finite(A=A, post=None):
        return torch_path.merged_finite(W, A, B, scale=0.5, fan_in_fan_out=fifo, post=post)

    assert finite() and finite(post=post)
    post[-1] = 2.0
    assert not finite(post=post)
    assert not finite(A=A.clone().index_fill_(1, torch.tensor([in_f - 1]), float("nan")))
    assert unchanged(before, W)


@pytest.mark.parametrize("adapters,what", [(({},), "lora_B"), (({"use_dora": True},), "lora_B"),
                                           (({"use_dora": True},), "zero_norm")])
def test_unsafe_merge_of_broken_adapter_matches_peft(unpatched, adapters, what):
    """Without safe_merge PEFT merges the NaNs; the patch hands such adapters to PEFT."""
    weights = []
    for patched in (False, True):
        if patched:
            peft_patch.patch_peft()
        model = build("llama", adapters)
        layer = _poison(model, "llama", what)
        model.merge_adapter()
        assert layer.merged_adapters == ["a0"]
        weights.append(base_weights(model))
        peft_patch.unpatch_peft()
    for name in weights[0]:
        nan = torch.isnan(weights[0][name])
        assert torch.equal(torch.isnan(weights[1][name]), nan), name
        torch.testing.assert_close(weights[1][name][~nan], weights[0][name][~nan],
                                   rtol=1e-5, atol=1e-6)


def test_patch_is_idempotent_and_unpatch_restores(unpatched):
    peft_patch.patch_peft()
    patched = {name: Linear.__dict__[name] for name in METHODS}
    assert all(patched[name] is not ORIGINAL[name] for name in METHODS)
    peft_patch.patch_peft()
    assert all(Linear.__dict__[name] is patched[name] for name in METHODS)
    assert peft_patch.is_patched()
    peft_patch.unpatch_peft()
    assert all(Linear.__dict__[name] is ORIGINAL[name] for name in METHODS)
    peft_patch.unpatch_peft()
    assert not peft_patch.is_patched()
    with pytest.raises(ValueError):
        peft_patch.patch_peft(backend="gpu")
    assert not peft_patch.is_patched()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_get_delta_weight(unpatched, kind):
    peft_patch.patch_peft()
    model = build(kind)
    layer = model.base_model.model.model.layers[0].mlp.down_proj if kind == "llama" else \
        model.base_model.model.transformer.h[0].attn.c_attn
    expected = ORIGINAL["get_delta_weight"](layer, "a0")
    with torch.no_grad():
        got = layer.get_delta_weight("a0")
    assert got.shape == expected.shape == layer.base_layer.weight.shape
    assert got.dtype == expected.dtype and got.grad_fn is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # with autograd on and trainable factors the caller may differentiate: PEFT's own code
    differentiable = layer.get_delta_weight("a0")
    assert differentiable.grad_fn is not None
    torch.testing.assert_close(differentiable.detach(), expected, rtol=0, atol=0)


def test_unsupported_weight_dtype_uses_peft(unpatched):
    """A float64 model is not a fused-op dtype: merge/unmerge are PEFT's, bit for bit."""
    weights = []
    for patched in (False, True):
        if patched:
            peft_patch.patch_peft()
        model = build("llama", ({}, {"use_dora": True}), dtype=torch.float64)
        model.merge_adapter()
        merged = base_weights(model)
        model.unmerge_adapter()
        weights.append((merged, base_weights(model)))
        peft_patch.unpatch_peft()
    for ours, theirs in zip(weights[1], weights[0]):
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_triton_backend_through_the_patch(unpatched, monkeypatch):
    """patch_peft(backend="triton"): the kernels (interpreted on the CPU) in PEFT's merge."""
    launches = []
    for module, name in ((triton_path, "launch_merge"), (dora, "_launch")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            launches.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    merged = []
    for backend in ("torch", "triton"):
        peft_patch.patch_peft(backend=backend)
        model = build("gpt2", ({"use_dora": True}, {}))
        y0 = output(model)
        model.merge_adapter()
        merged.append(base_weights(model))
        torch.testing.assert_close(output(model), y0, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(output(model), y0, rtol=1e-4, atol=1e-4)
        peft_patch.unpatch_peft()
        assert bool(launches) == (backend == "triton")
    assert {"launch_merge", "_launch"} <= set(launches)
    assert_same_weights(merged[1], merged[0])


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU memory (LORASC_TEST_GPU=1)")
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_gpu_memory(unpatched, use_dora, safe_merge):
    """On CUDA the patched merge and unmerge (Triton) allocate almost nothing beyond W."""
    peft_patch.patch_peft()
    torch.manual_seed(0)
    config = LoraConfig(r=16, target_modules=["0"], init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4096, 4096)).to(DEVICE), config)
    w_bytes = model.base_model.model[0].base_layer.weight.nbytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model.merge_adapter(safe_merge=safe_merge)
    model.unmerge_adapter()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= w_bytes / 8


PROBE = textwrap.dedent("""
    import gc, json, sys, torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    import lorasc_fast
    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def extra_bytes(run):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = status("VmRSS:")
        run()
        return status("VmHWM:") - before

    def model(n=4096, **kw):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(n, n))
        config = LoraConfig(r=16, target_modules=["0"], init_lora_weights=False, **kw)
        return get_peft_model(m, config)

    out = {"w_bytes": 4096 * 4096 * 4}
    if sys.argv[1] == "patched":
        lorasc_fast.patch_peft()
    for kw in ({}, {"use_dora": True}):  # warm-up: lazy imports, first-call allocations
        warm = model(64, **kw)
        warm.merge_adapter(safe_merge=True)
        warm.unmerge_adapter()
    dora = {"use_dora": True}
    for name, kw, safe in [("lora", {}, False), ("lora_safe", {}, True),
                           ("dora", dora, False), ("dora_safe", dora, True)]:
        m = model(**kw)
        out[name + "_merge"] = extra_bytes(lambda: m.merge_adapter(safe_merge=safe))
        out[name + "_unmerge"] = extra_bytes(m.unmerge_adapter)
        del m
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_merge_has_no_weight_sized_temporaries():
    """Peak RSS over each merge/unmerge of a 4096 x 4096 fp32 layer (64 MiB), in a fresh
    process: PEFT's own code allocates several W-sized tensors, the patch none."""
    res = {mode: run_probe(PROBE, mode) for mode in ("unpatched", "patched")}
    w = res["patched"].pop("w_bytes")
    for key, extra in res["patched"].items():
        assert extra <= w / 8, (key, res)
        assert res["unpatched"][key] >= w, (key, res)  # the probe does see W-sized temporaries
