"""LoRASC controller and cascade_schedule on tiny transformers models (Llama, GPT-2 Conv1D,
BERT) with LoRA, rsLoRA, DoRA and LoRA+: every boundary against ``lorasc_fast.reference``."""
import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from lorasc_fast import LoRASC, cascade_schedule, reference, stream
from lorasc_fast.cascade import INIT, NOISE, stream_seed

ADAPTER = "default"


def tiny(kind: str, *, init_seed: int = 0, lora_dropout: float = 0.0, **lora):
    """A tiny PEFT model of ``kind`` and token inputs for it (built in fp32 on the CPU)."""
    torch.manual_seed(init_seed)
    if kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
        targets, task = ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"
    elif kind == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                          n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
        targets, task = ["c_attn", "c_proj"], "CAUSAL_LM"
        lora.setdefault("fan_in_fan_out", True)
    elif kind == "bert":
        base = BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=32, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        targets, task = ["query", "value", "output.dense"], "SEQ_CLS"
    else:
        raise ValueError(kind)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task,
                        lora_dropout=lora_dropout, **lora)
    return get_peft_model(base, config)


def inputs(n=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g)


def outputs(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def fast(layer):
    m = layer.module
    return m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight


def weight(layer):
    return layer.module.get_base_layer().weight


@torch.no_grad()
def pretend_training(cascade, gen):
    """Move every fast factor somewhere else, as training would."""
    for layer in cascade.layers:
        A, B = fast(layer)
        A.add_(0.1 * torch.randn(A.shape, generator=gen))
        B.copy_(0.2 * torch.randn(B.shape, generator=gen))


def expected_init(cascade, i, boundary, shape, r):
    g = torch.Generator().manual_seed(stream_seed(cascade.seed, boundary, i, INIT))
    A = torch.empty(shape)
    if cascade.init_kind == "gaussian":
        return torch.nn.init.normal_(A, std=1 / r, generator=g)
    return torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)


def dora_reference(W, A, B, m, scale, noise, seed, fan_in_fan_out):
    """``m * (W + s B A + noise (U - 1/2)) / ||.||_row`` in fp64 (rows = output rows)."""
    V = (W.T if fan_in_fan_out else W).double() + scale * (B.double() @ A.double())
    words = stream.matrix_words(seed, *W.shape).to(torch.int64)
    U = stream.noise_from_words(words, noise).double()
    V = V + (U.T if fan_in_fan_out else U)
    out = m.double()[:, None] * V / V.norm(dim=1, keepdim=True)
    return (out.T if fan_in_fan_out else out).float()


# ---- boundaries against the reference --------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_boundaries_match_reference(kind, variant, gen):
    model = tiny(kind, use_rslora=variant == "rslora")
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    cascade = LoRASC(model, alpha=0.6, noise_lambda=1.0, seed=seed)
    assert len(cascade.layers) >= 4
    for layer in cascade.layers:
        s = layer.module.scaling[ADAPTER]
        assert s == pytest.approx(8 / 2 if variant == "rslora" else 8 / 4)
    slow = [(l.A_slow.clone(), l.B_slow.clone()) for l in cascade.layers]
    for boundary in (1, 2, 3):
        pretend_training(cascade, gen)
        before = [(weight(l).clone(), *(p.clone() for p in fast(l))) for l in cascade.layers]
        cascade.step()
        assert cascade.boundaries == boundary
        for i, (layer, (W, A_f, B_f), (A_s, B_s)) in enumerate(zip(cascade.layers, before, slow)):
            assert (weight(layer) - W).abs().max() > 1e-3  # it did merge
            reference.cascade_merge_(W, A_s, B_s, A_f, B_f, alpha=0.6,
                                     scale=layer.module.scaling[ADAPTER], noise_lambda=1.0,
                                     seed=stream_seed(seed, boundary, i, NOISE),
                                     fan_in_fan_out=kind == "gpt2")
            torch.testing.assert_close(layer.A_slow, A_s, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(layer.B_slow, B_s, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(weight(layer), W, rtol=1e-5, atol=1e-6)
            A_new, B_new = fast(layer)
            assert torch.equal(A_new, expected_init(cascade, i, boundary, A_new.shape, 4))
            assert not B_new.any()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_triton_boundaries_use_one_plan(kind, gen):
    """On the Triton backend the plain layers go through one grouped call whose plan is built
    once and reused; the merged weights follow the spec to fp32 accuracy."""
    model = tiny(kind)
    cascade = LoRASC(model, alpha=0.6, noise_lambda=1.0, seed=5, backend="triton")
    slow = [(l.A_slow.clone(), l.B_slow.clone()) for l in cascade.layers]
    plans = []
    for boundary in (1, 2):
        pretend_training(cascade, gen)
        before = [(weight(l).clone(), *(p.clone() for p in fast(l))) for l in cascade.layers]
        cascade.step()
        plans.append(cascade._plan)
        for i, (layer, (W, A_f, B_f), (A_s, B_s)) in enumerate(zip(cascade.layers, before, slow)):
            reference.cascade_merge_(W, A_s, B_s, A_f, B_f, alpha=0.6,
                                     scale=layer.module.scaling[ADAPTER], noise_lambda=1.0,
                                     seed=stream_seed(5, boundary, i, NOISE),
                                     fan_in_fan_out=kind == "gpt2")
            torch.testing.assert_close(weight(layer), W, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.A_slow, A_s, rtol=1e-6, atol=1e-7)
    assert plans[0] is not None and plans[0] is plans[1]


def test_boundary_bit_exact_with_reference_backend(gen):
    """With backend="reference" the controller is exactly the spec, Conv1D layout included."""
    model = tiny("gpt2")
    cascade = LoRASC(model, alpha=0.5, noise_lambda=10.0, seed=7, backend="reference")
    slow = [(l.A_slow.clone(), l.B_slow.clone()) for l in cascade.layers]
    for boundary in (1, 2):
        pretend_training(cascade, gen)
        before = [(weight(l).clone(), *(p.clone() for p in fast(l))) for l in cascade.layers]
        cascade.step()
        for i, (layer, (W, A_f, B_f), (A_s, B_s)) in enumerate(zip(cascade.layers, before, slow)):
            reference.cascade_merge_(W, A_s, B_s, A_f, B_f, alpha=0.5, scale=2.0, noise_lambda=10.0,
                                     seed=stream_seed(7, boundary, i, NOISE), fan_in_fan_out=True)
            assert torch.equal(weight(layer), W)
            assert torch.equal(layer.A_slow, A_s) and torch.equal(layer.B_slow, B_s)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_reinit_is_peft_init(init, gen):
    """The re-init draws what PEFT's reset_lora_parameters draws from the same seed."""
    model = tiny("llama", init_lora_weights=init)
    cascade = LoRASC(model, seed=3)
    assert cascade.init_kind == ("gaussian" if init == "gaussian" else "kaiming")
    pretend_training(cascade, gen)
    rng = torch.get_rng_state()
    cascade.step()
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither used nor moved
    for i, layer in enumerate(cascade.layers):
        A_ours, B_ours = (p.clone() for p in fast(layer))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(3, 1, i, INIT))
            layer.module.reset_lora_parameters(ADAPTER, init)
        assert torch.equal(A_ours, fast(layer)[0]) and torch.equal(B_ours, fast(layer)[1])


def test_noise_streams_differ_per_layer_and_boundary():
    seeds = {stream_seed(0, b, i, p) for b in range(4) for i in range(8) for p in (NOISE, INIT)}
    assert len(seeds) == 64 and all(0 <= s < 2**64 for s in seeds)
    assert stream_seed(5, 1, 2, NOISE) == stream_seed(5, 1, 2, NOISE) != stream_seed(6, 1, 2, NOISE)


def test_step0_noise_only_for_nonzero_initial_product():
    model = tiny("llama")  # default init: B = 0, no step-0 noise
    W0 = [weight(l).clone() for l in LoRASC(tiny("llama")).layers]
    cascade = LoRASC(model, seed=11)
    assert not cascade.init_noise_applied
    assert all(torch.equal(weight(l), w) for l, w in zip(cascade.layers, W0))

    model = tiny("llama", init_lora_weights=False)  # B != 0
    W0 = [p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n]
    cascade = LoRASC(model, seed=11, noise_lambda=2.0)
    assert cascade.init_noise_applied
    for i, (layer, W) in enumerate(zip(cascade.layers, W0)):
        std = reference.lowrank_moments(layer.A_slow, layer.B_slow, layer.module.scaling[ADAPTER])[1]
        assert std > 0 and (weight(layer) - W).abs().max() > 1e-3
        reference.add_noise_(W, 2.0 * float(std), seed=stream_seed(11, 0, i, NOISE))
        torch.testing.assert_close(weight(layer), W, rtol=1e-6, atol=1e-7)


# ---- DoRA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_boundary(kind, gen):
    model = tiny(kind, use_dora=True)
    ids = inputs()
    cascade = LoRASC(model, alpha=0.8, noise_lambda=1.0, seed=5)
    assert all(l.dora for l in cascade.layers)
    fifo = kind == "gpt2"
    slow = [(l.A_slow.clone(), l.B_slow.clone()) for l in cascade.layers]
    for boundary in (1, 2):
        pretend_training(cascade, gen)
        with torch.no_grad():
            for layer in cascade.layers:  # the magnitude trains too
                m = layer.module.lora_magnitude_vector[ADAPTER].weight
                m.mul_(1 + 0.1 * torch.rand(m.shape, generator=gen))
        before = [(weight(l).clone(), *(p.clone() for p in fast(l))) for l in cascade.layers]
        cascade.step()
        for i, (layer, (W, A_f, B_f), (A_s, B_s)) in enumerate(zip(cascade.layers, before, slow)):
            reference.ema_([A_s, B_s], [A_f, B_f], 0.8)
            s = layer.module.scaling[ADAPTER]
            std = float(reference.lowrank_moments(A_s, B_s, s)[1])
            m = layer.module.lora_magnitude_vector[ADAPTER].weight.detach()
            expect = dora_reference(W, A_s, B_s, m, s, std, stream_seed(5, boundary, i, NOISE), fifo)
            torch.testing.assert_close(weight(layer), expect, rtol=1e-5, atol=1e-6)
            rows = weight(layer).T if fifo else weight(layer)
            torch.testing.assert_close(rows.norm(dim=1), m, rtol=1e-5, atol=1e-6)
        # fast B = 0 and ||W||_row = m: the DoRA layer is exactly its (merged) base layer
        with model.disable_adapter():
            base_out = outputs(model, ids)
        torch.testing.assert_close(outputs(model, ids), base_out, rtol=1e-5, atol=1e-5)


# ---- finish / merge_and_unload ----------------------------------------------------------------

@pytest.mark.parametrize("kind,variant", [("llama", "lora"), ("gpt2", "rslora"), ("bert", "lora"),
                                          ("gpt2", "dora"), ("bert", "dora")])
def test_finish_then_merge_and_unload(kind, variant, gen):
    model = tiny(kind, use_rslora=variant == "rslora", use_dora=variant == "dora")
    ids = inputs()
    cascade = LoRASC(model, alpha=0.8, noise_lambda=1.0, seed=2)
    pretend_training(cascade, gen)
    cascade.step()
    pretend_training(cascade, gen)
    before = [(weight(l).clone(), *(p.clone() for p in fast(l))) for l in cascade.layers]
    slow = [(l.A_slow.clone(), l.B_slow.clone()) for l in cascade.layers]
    cascade.finish()
    assert cascade.finished
    for i, (layer, (W, A_f, B_f), (A_s, B_s)) in enumerate(zip(cascade.layers, before, slow)):
        assert not fast(layer)[1].any()
        assert torch.equal(fast(layer)[0], A_f)  # no re-init
        if variant != "dora":  # final merge: EMA + merge, no noise
            reference.cascade_merge_(W, A_s, B_s, A_f, B_f, alpha=0.8,
                                     scale=layer.module.scaling[ADAPTER], noise_lambda=0.0,
                                     fan_in_fan_out=kind == "gpt2")
            torch.testing.assert_close(weight(layer), W, rtol=1e-5, atol=1e-6)
    adapted = outputs(model, ids)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tol = dict(rtol=1e-5, atol=1e-5) if variant == "dora" else dict(rtol=0, atol=0)
    torch.testing.assert_close(outputs(merged, ids), adapted, **tol)
    with pytest.raises(RuntimeError, match="finish"):
        cascade.step()


def test_finish_right_after_a_boundary_adds_no_expert(gen):
    cascade = LoRASC(tiny("llama"), seed=1)
    pretend_training(cascade, gen)
    cascade.step()
    W = [weight(l).clone() for l in cascade.layers]
    cascade.finish()
    assert all(torch.equal(weight(l), w) for l, w in zip(cascade.layers, W))


# ---- optimizer state --------------------------------------------------------------------------

def train_steps(model, optimizer, ids, labels, n, scheduler=None, cascade=None):
    model.train()
    for _ in range(n):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        if cascade is not None:
            cascade.on_optimizer_step(optimizer)


@pytest.mark.parametrize("variant", ["lora", "loraplus", "dora"])
def test_optimizer_state_cleared_for_fast_params_only(variant):
    model = tiny("bert", use_dora=variant == "dora")
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "loraplus":
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids, labels = inputs(), torch.tensor([0, 1, 2])
    train_steps(model, optimizer, ids, labels, 2)
    cascade = LoRASC(model)
    fast_ids = {id(p) for p in cascade.fast_parameters()}
    others = [p for p in params if id(p) not in fast_ids]
    assert others and any("classifier" in n for n, p in model.named_parameters()
                           if p.requires_grad and id(p) not in fast_ids)
    assert all(p in optimizer.state for p in params)
    kept = {p: copy.deepcopy(optimizer.state[p]) for p in others}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    group_params = [list(g["params"]) for g in optimizer.param_groups]
    cascade.step(optimizer)
    for p in cascade.fast_parameters():
        assert p not in optimizer.state and p.grad is None
    for p, st in kept.items():
        assert optimizer.state[p].keys() == st.keys()
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in st.items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    assert [list(g["params"]) for g in optimizer.param_groups] == group_params
    if variant == "loraplus":
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for layer in cascade.layers:
            A, B = fast(layer)
            assert lrs[id(B)] == 16 * lrs[id(A)]
    train_steps(model, optimizer, ids, labels, 1)  # the fresh expert trains from fresh state
    for p in cascade.fast_parameters():
        assert int(optimizer.state[p]["step"]) == 1
    assert all(fast(l)[1].any() for l in cascade.layers)


# ---- hooks and checkpoints ---------------------------------------------------------------------

def test_hooks_follow_every():
    cascade = LoRASC(tiny("llama"), every=2)
    assert [cascade.on_optimizer_step() for _ in range(5)] == [False, True, False, True, False]
    assert not cascade.on_epoch_end() and cascade.boundaries == 2
    cascade = LoRASC(tiny("llama"))
    assert not cascade.on_optimizer_step() and cascade.on_epoch_end() and cascade.boundaries == 1


def _run(steps, *, resume_at=None, tmp_path=None):
    """Train a tiny Llama (LoRA dropout, AdamW, cascade schedule, boundary every 3 steps) for
    ``steps`` steps, optionally saving everything after ``resume_at`` steps and continuing in a
    freshly built process-like setup; returns the final state dict."""
    data = [inputs(2, 6, seed=100 + t) for t in range(steps)]

    def build(init_seed):
        model = tiny("llama", init_seed=init_seed, lora_dropout=0.2)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = cascade_schedule(optimizer, 3, warmup_steps=1)
        cascade = LoRASC(model, alpha=0.6, noise_lambda=1.0, seed=9, every=3)
        return model, optimizer, scheduler, cascade

    def loop(objs, start, stop):
        model, optimizer, scheduler, cascade = objs
        model.train()
        for t in range(start, stop):
            loss = model(input_ids=data[t], labels=data[t]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            cascade.on_optimizer_step(optimizer)

    torch.manual_seed(1234)
    objs = build(0)
    if resume_at is None:
        loop(objs, 0, steps)
    else:
        loop(objs, 0, resume_at)
        model, optimizer, scheduler, cascade = objs
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "cascade": cascade.state_dict(),
                    "rng": torch.get_rng_state()}, tmp_path / "ckpt.pt")
        del objs, model, optimizer, scheduler, cascade
        torch.manual_seed(999)  # the restart must not depend on the process's RNG
        objs = build(42)  # different initial weights: everything comes from the checkpoint
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        model, optimizer, scheduler, cascade = objs
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        cascade.load_state_dict(ckpt["cascade"])
        torch.set_rng_state(ckpt["rng"])
        loop(objs, resume_at, steps)
    objs[3].finish()
    assert objs[3].boundaries == (steps - 1) // 3
    return {k: v.clone() for k, v in objs[0].state_dict().items()}


@pytest.mark.parametrize("resume_at", [3, 5])
def test_resume_is_bit_exact(resume_at, tmp_path):
    full = _run(8)
    resumed = _run(8, resume_at=resume_at, tmp_path=tmp_path)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_load_state_dict_checks_before_writing():
    cascade = LoRASC(tiny("llama"), seed=1)
    state = copy.deepcopy(cascade.state_dict())
    other = LoRASC(tiny("llama"), seed=2)
    slow = [(l.A_slow.clone(), l.B_slow.clone()) for l in other.layers]
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    state["config"]["seed"] = 2
    state["slow"][cascade.layers[-1].name]["A"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict(state)
    assert all(torch.equal(l.A_slow, a) and torch.equal(l.B_slow, b)
               for l, (a, b) in zip(other.layers, slow))


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(alpha=1.5), dict(noise_lambda=-1.0), dict(seed=-1),
                                dict(rounding="up"), dict(every=0), dict(every="step")])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        LoRASC(tiny("llama"), **kw)


def test_no_lora_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA"):
        LoRASC(torch.nn.Linear(3, 3))


def test_nan_fast_factor_modifies_nothing(gen):
    cascade = LoRASC(tiny("llama"))
    pretend_training(cascade, gen)
    with torch.no_grad():
        fast(cascade.layers[-1])[1][0, 0] = float("nan")
    snapshot = [t.clone() for l in cascade.layers for t in (weight(l), l.A_slow, l.B_slow, *fast(l))]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.lora_B has NaN"):
        cascade.step()
    after = [t for l in cascade.layers for t in (weight(l), l.A_slow, l.B_slow, *fast(l))]
    assert all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(snapshot, after))
    assert cascade.boundaries == 0


def with_dora(model, names):
    """Turn the LoRA layers ending in ``names`` into DoRA layers (PEFT's own ``update_layer``):
    one adapter with plain and DoRA layers, so a boundary runs both merge paths."""
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True)
    for name, m in model.named_modules():
        if name.endswith(names):
            m.update_layer(ADAPTER, 4, 8, config=config)
    return model


def every_tensor(cascade):
    """Every tensor a boundary may write: base weights, slow and fast factors, DoRA magnitudes."""
    out = []
    for layer in cascade.layers:
        out += [weight(layer), layer.A_slow, layer.B_slow, *fast(layer)]
        if layer.dora:
            out.append(layer.module.lora_magnitude_vector[ADAPTER].weight)
    return out


def assert_bit_identical(before, after):
    assert len(before) == len(after)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not (
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))]
    assert not changed, f"tensors {changed} changed"


def overflow_fast(layer, gen):
    """Finite fast factors whose EMA'd product overflows fp32 (std ~ 1e58)."""
    with torch.no_grad():
        for t in fast(layer):
            t.copy_(1e30 * torch.randn(t.shape, generator=gen))


def nan_magnitude(layer, gen):
    with torch.no_grad():
        layer.module.lora_magnitude_vector[ADAPTER].weight[1] = float("nan")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the overflow
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("fault", [overflow_fast, nan_magnitude])
@pytest.mark.parametrize("method", ["step", "finish"])
def test_refused_boundary_modifies_nothing(backend, fault, method, gen):
    """Plain layers, a healthy DoRA layer and, last, a DoRA layer that refuses (its EMA'd
    product overflows fp32, or its magnitude holds a NaN): the boundary raises naming that
    layer, and no weight, slow or fast factor or magnitude of any layer has changed."""
    model = with_dora(tiny("llama"), ("layers.0.mlp.down_proj", "layers.1.mlp.down_proj"))
    cascade = LoRASC(model, seed=3, backend=backend)
    assert [l.dora for l in cascade.layers] == [False, False, True, False, False, True]
    pretend_training(cascade, gen)
    fault(cascade.layers[-1], gen)
    before = [t.clone() for t in every_tensor(cascade)]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*nothing was"):
        getattr(cascade, method)()
    assert_bit_identical(before, every_tensor(cascade))
    assert cascade.boundaries == 0 and not cascade.finished
    with torch.no_grad():  # repaired, the same controller runs the boundary
        for t, b in zip(every_tensor(cascade), before):
            t.copy_(b.nan_to_num(1.0).clamp(-1, 1))
    getattr(cascade, method)()
    assert not torch.equal(weight(cascade.layers[0]), before[0])


def test_refused_construction_noise_modifies_nothing(gen):
    """Step-0 noise: a non-finite initial std on the last layer is refused before any layer's
    base weight gets noise."""
    model = tiny("llama", init_lora_weights=False)
    layers = [m for n, m in model.named_modules() if n.endswith("layers.1.mlp.down_proj")]
    with torch.no_grad():
        for t in (layers[0].lora_A[ADAPTER].weight, layers[0].lora_B[ADAPTER].weight):
            t.copy_(1e30 * torch.randn(t.shape, generator=gen))
    before = [p.detach().clone() for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*nothing was"):
        LoRASC(model, noise_lambda=1.0)
    assert_bit_identical(before, [p.detach() for n, p in model.named_parameters()])


def test_merged_adapter_is_refused():
    model = tiny("llama")
    cascade = LoRASC(model)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        cascade.step()


def test_adapter_selection():
    model = tiny("llama")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    assert LoRASC(model).adapter_name == ADAPTER  # the active one
    cascade = LoRASC(model, adapter_name="other")
    assert len(cascade.layers) == 2 and all("q_proj" in l.name for l in cascade.layers)


# ---- schedule --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_restarts_every_expert(kind):
    p = torch.nn.Parameter(torch.zeros(1))
    q = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 1.6}])
    scheduler = cascade_schedule(optimizer, 5, warmup_steps=2, kind=kind)
    lrs = []
    for _ in range(15):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    span = [0.0, 0.5] + ([1.0, 2 / 3, 1 / 3] if kind == "linear" else
                         [1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))])
    assert [a for a, _ in lrs] == pytest.approx([0.1 * f for f in span * 3])
    assert [b / a for a, b in lrs if a] == pytest.approx([16.0] * 12)  # LoRA+ ratio kept


@pytest.mark.parametrize("kw", [dict(steps_per_expert=0), dict(steps_per_expert=4, warmup_steps=4),
                                dict(steps_per_expert=4, kind="step")])
def test_schedule_bad_args(kw):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        cascade_schedule(optimizer, **kw)
