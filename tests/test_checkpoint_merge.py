"""``lorasc merge``: the out-of-core merge against PEFT's ``merge_and_unload`` + ``save_pretrained``
on tiny transformers models, the layout and metadata of OUT, every refusal, and atomicity."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorasc_fast as lf
from lorasc_fast import checkpoint_merge as cm
from lorasc_fast.checkpoint_errors import MergeError
from lorasc_fast.checkpoint_plan import resolve_names, tensor_seed
from lorasc_fast.checkpoint_safetensors import read_header
from lorasc_fast.cli import main as cli_main
from helpers import DEVICE, fp32_error_bound, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PFX = "base_model.model."
# the merges run on helpers.DEVICE (CUDA, Triton kernels, with LORASC_TEST_GPU=1); PEFT's on the CPU


# ----------------------------------------------------------------------------- helpers
def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes (BASE/ADAPTER must never change)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".lorasc-" in p.name]


def merge(base, adapter, out, block_mib=None, **kw):
    if block_mib is not None:
        kw["block_mib"] = block_mib
    kw.setdefault("progress", False)
    kw.setdefault("device", DEVICE.type)
    return cm.merge_checkpoint(base, adapter, out, **kw)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at |x| (fp64)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def llama(dtype=torch.float32, **over):
    return tiny_llama(**{**dict(vocab_size=96, hidden_size=64, intermediate_size=128,
                                tie_word_embeddings=False), **over}).to(dtype)


def gpt2(dtype=torch.float32):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def train_like(pm, gen):
    """Give every adapter tensor non-trivial values (PEFT initialises B = 0, m = ||W||)."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def peft_pair(tmp_path, gen, model_fn, lora_kw, dtype=torch.float32):
    """BASE from ``model_fn``, a trained-looking ADAPTER on it, PEFT's own merged save, and
    each LoRA module's (scaling, stored-transposed) as PEFT set them up."""
    torch.manual_seed(gen.initial_seed())
    base, adapter, ref = tmp_path / "base", tmp_path / "adapter", tmp_path / "peft"
    model = model_fn(dtype)
    model.save_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora_kw))
    train_like(pm, gen)
    pm.save_pretrained(adapter)
    layers = {name[len(PFX):] + ".weight": (m.scaling["default"], isinstance(
                  m, peft.tuners.lora.Embedding) or getattr(m, "fan_in_fan_out", False))
              for name, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    cls = type(model)
    merged = peft.PeftModel.from_pretrained(cls.from_pretrained(base, dtype=dtype), adapter)
    merged.merge_and_unload().save_pretrained(ref)
    return base, adapter, ref, layers


# ------------------------------------------------------------------- equality with PEFT
LLAMA_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora+patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                            rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 3}),
    "dora": dict(r=4, lora_alpha=16, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    "embedding+modules_to_save": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "k_proj"],
                                      modules_to_save=["norm"]),
}


def assert_close_to_peft(out: Path, ref: Path, base: Path, adapter: Path, layers, dora: bool):
    """Untouched and replaced tensors: equal. LoRA in fp32 on the CPU: bit-identical (the
    torch path forms (B@A)*s and adds it, in PEFT's order). bf16: within the fp32
    forward-error bound of W + s*B@A plus one bf16 ulp (which only matters where W + s*B@A
    nearly cancels). DoRA: 8 fp32 ulps more, the two fp32 norms over in_features terms
    being summed in different orders."""
    ours = load_file(out / "model.safetensors")
    theirs = load_file(ref / "model.safetensors")
    base_t = load_file(base / "model.safetensors")
    ad = load_file(adapter / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() == base_t.keys()
    changed = 0
    for name, t in ours.items():
        p = theirs[name]
        assert t.dtype == p.dtype == base_t[name].dtype and t.shape == p.shape, name
        changed += not torch.equal(t, base_t[name])
        if name not in layers:
            assert torch.equal(t, p), name  # untouched, or replaced by a saved full tensor
            continue
        mod = PFX + name[: -len(".weight")]
        a = ad.get(f"{mod}.lora_A.weight", ad.get(f"{mod}.lora_embedding_A"))
        b = ad.get(f"{mod}.lora_B.weight", ad.get(f"{mod}.lora_embedding_B"))
        scaling, transposed = layers[name]
        bound = fp32_error_bound(base_t[name], a, b, scaling, 0.0, transposed)
        if dora:
            bound = 2 * bound + (8 if t.dtype == torch.float32 else 1) * ulp(p)
        elif t.dtype == torch.float32 and DEVICE.type == "cpu":
            assert torch.equal(t, p), name
        else:
            bound = bound + ulp(p)
        assert ((t.double() - p.double()).abs() <= bound).all(), name
    assert changed >= len(layers) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_matches_peft(tmp_path, gen, case, dtype):
    if case.startswith("embedding") and dtype == torch.bfloat16:
        pytest.skip("covered in fp32")
    base, adapter, ref, layers = peft_pair(tmp_path, gen, llama, LLAMA_CASES[case], dtype)
    out = tmp_path / "out"
    # bf16 runs merge in blocks of 3 rows (of the widest tensor): the result must not change
    block_mib = None if dtype == torch.float32 else 3 * 128 * 4 / 2**20
    summary = merge(base, adapter, out, block_mib=block_mib)
    assert summary["modules"] == len(layers)
    assert_close_to_peft(out, ref, base, adapter, layers, dora=case == "dora")
    assert sorted(os.listdir(out)) == sorted(os.listdir(base))


def test_lora_bias_matches_peft(tmp_path, gen):
    base, adapter, ref, _ = peft_pair(
        tmp_path, gen, lambda dt: llama(dt, attention_bias=True),
        dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B.bias is zero-initialised: give it values
        t = load_file(adapter / "adapter_model.safetensors")
        for k in t:
            if k.endswith("lora_B.bias"):
                t[k] = torch.randn(t[k].shape, generator=gen)
        save_file(t, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    merged = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(ref)
    out = tmp_path / "out"
    merge(base, adapter, out)
    ours, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    base_t = load_file(base / "model.safetensors")
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(ours[bias], base_t[bias])
    for name in ours:
        assert ((ours[name] - theirs[name]).abs() <= 4 * ulp(theirs[name]) + 1e-7).all(), name


@pytest.mark.parametrize("rows", [None, 8], ids=["whole", "8-row-blocks"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path, gen, dora, rows):
    """Stored rows are input features here: DoRA's norms run over blocks and are summed."""
    base, adapter, ref, layers = peft_pair(tmp_path, gen, gpt2, dict(
        r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=dora,
        target_modules=["c_attn", "c_proj", "c_fc"]))
    out = tmp_path / "out"
    merge(base, adapter, out, block_mib=rows and rows * 256 * 4 / 2**20)
    assert_close_to_peft(out, ref, base, adapter, layers, dora=dora)


def test_bare_backbone_checkpoint_maps_by_one_prefix_rule(tmp_path, gen):
    """An adapter trained on LlamaForCausalLM merges into a checkpoint of the bare LlamaModel."""
    base, adapter, ref, _ = peft_pair(tmp_path, gen, llama, LLAMA_CASES["lora"])
    full = load_file(base / "model.safetensors")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k[len("model."):]: v for k, v in full.items() if k.startswith("model.")},
              bare / "model.safetensors", metadata={"format": "pt"})
    merge(bare, adapter, tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(ref / "model.safetensors")
    name = "layers.1.self_attn.v_proj.weight"
    assert torch.allclose(ours[name], theirs["model." + name], rtol=0, atol=1e-6)
    with pytest.raises(MergeError, match="more than one way"):
        resolve_names({"a.w": "k"}, {"x.a.w", "y.a.w"})
    mapped = resolve_names({"m.a.w": "k", "b.w": "k2"}, {"a.w", "b.w"})
    assert mapped == {"m.a.w": "a.w", "b.w": "b.w"}


# --------------------------------------------------- a hand-written sharded checkpoint
OUT_F, IN_F, R = 24, 40, 4


def write_sharded(root: Path, gen, dtype=torch.float32):
    """Two shards + index + non-weight files: Linear, Conv1D-style (in x out) and untouched
    tensors, an int buffer, a bias."""
    root.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.layers.0.proj.weight": torch.randn(OUT_F, IN_F, generator=gen).to(dtype),
            "model.layers.0.proj.bias": torch.randn(OUT_F, generator=gen).to(dtype),
            "model.embed.weight": torch.randn(50, IN_F, generator=gen).to(dtype),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.proj.weight": torch.randn(OUT_F, IN_F, generator=gen).to(dtype),
            "model.layers.1.norm.weight": torch.randn(IN_F, generator=gen).to(dtype),
            "model.position_ids": torch.arange(32).view(1, 32),
            "model.layers.1.q8.weight": torch.randint(-8, 8, (OUT_F, IN_F), generator=gen,
                                                      dtype=torch.int8),
        },
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, root / shard, metadata={"format": "pt", "origin": "test"})
        weight_map.update({k: shard for k in tensors})
    total = sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text('{"model_type": "toy"}')
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (root / "training_args.bin").write_bytes(b"\x80\x04pickle")
    return {k: v for s in shards.values() for k, v in s.items()}


def write_adapter(root: Path, gen, tensors=None, **cfg):
    root.mkdir()
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "lora_bias": False}
    config.update(cfg)
    if tensors is None:
        tensors = {}
        for layer in (0, 1):
            mod = f"{PFX}model.layers.{layer}.proj"
            tensors[f"{mod}.lora_A.weight"] = torch.randn(R, IN_F, generator=gen)
            tensors[f"{mod}.lora_B.weight"] = torch.randn(OUT_F, R, generator=gen) * 0.1
    (root / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, root / "adapter_model.safetensors", metadata={"format": "pt"})
    return tensors


def assert_same_merge(x: torch.Tensor, y: torch.Tensor, name: str):
    """Merging in row blocks (``row_offset``) gives what merging the whole tensor gives: bit
    for bit on the torch path; on CUDA the Triton launch configuration follows the block's
    shape, which may move an fp32 result by one ulp (and so, rarely, a rounding to bf16)."""
    if DEVICE.type == "cpu":
        assert torch.equal(x, y), name
    else:
        assert ((x.double() - y.double()).abs() <= 2 * ulp(y)).all(), name


def expected_merge(W, a, b, scale, **kw):
    """The fused op on the whole tensor in memory, on the merge's device."""
    out = W.to(DEVICE, copy=True)
    lf.merge_(out, a.to(DEVICE), b.to(DEVICE), scale=scale, **kw)
    return out.cpu()


@pytest.mark.parametrize("dtype,rounding",
                         [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")],
                         ids=["fp32", "bf16-sr"])
def test_sharded_layout_metadata_and_blocks(tmp_path, gen, dtype, rounding):
    base_t = write_sharded(tmp_path / "base", gen, dtype)
    ad = write_adapter(tmp_path / "adapter", gen)
    before = tree_digest(tmp_path / "base"), tree_digest(tmp_path / "adapter")
    out = tmp_path / "out"
    # a tiny block (8 rows) forces many row blocks per tensor: the result must not depend on it
    summary = merge(tmp_path / "base", tmp_path / "adapter", out, rounding=rounding, seed=7,
                    block_mib=8 * IN_F * 4 / 2**20)
    assert summary["skipped"] == ["training_args.bin"] and summary["tensors_changed"] == 2
    assert (tree_digest(tmp_path / "base"), tree_digest(tmp_path / "adapter")) == before
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        set(before[0]) - {"training_args.bin"})
    assert (out / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()

    base_index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    adapter_file = tmp_path / "adapter" / "adapter_model.safetensors"
    sha = hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    for shard in set(base_index["weight_map"].values()):
        h_out, h_base = read_header(out / shard), read_header(tmp_path / "base" / shard)
        # same names, dtypes, shapes and data offsets, in the same order
        assert list(h_out.tensors.values()) == list(h_base.tensors.values())
        meta = h_out.metadata
        assert meta["format"] == "pt" and meta["origin"] == "test"
        assert meta["lorasc_merge.adapter_sha256"] == sha
        assert index["metadata"]["lorasc_merge.adapter_sha256"] == sha
        assert meta["lorasc_merge.rounding"] == rounding and meta["lorasc_merge.seed"] == "7"
        assert meta["lorasc_merge.lorasc_fast_version"] == lf.__version__
        assert meta["lorasc_merge.adapter"] == str((tmp_path / "adapter").resolve())

    merged = {}
    for shard in set(base_index["weight_map"].values()):
        merged.update(load_file(out / shard))
    for name, W in base_t.items():
        mod = f"{PFX}{name[: -len('.weight')]}"
        if f"{mod}.lora_A.weight" in ad:
            want = expected_merge(W, ad[f"{mod}.lora_A.weight"], ad[f"{mod}.lora_B.weight"], 2.0,
                                  rounding=rounding, seed=tensor_seed(7, name))
            assert_same_merge(merged[name], want, name)
            assert not torch.equal(merged[name], W)
        else:
            assert torch.equal(merged[name], W), name


def test_stochastic_rounding_seeded_and_dtype_conversion(tmp_path, gen):
    base_t = write_sharded(tmp_path / "base", gen, torch.float32)
    ad = write_adapter(tmp_path / "adapter", gen)
    runs = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        merge(tmp_path / "base", tmp_path / "adapter", tmp_path / tag, dtype="bfloat16",
              rounding="stochastic", seed=seed, block_mib=1e-3 * (1 + (tag == "b")))
        runs[tag] = {**load_file(tmp_path / tag / "model-00001-of-00002.safetensors"),
                     **load_file(tmp_path / tag / "model-00002-of-00002.safetensors")}
    name = "model.layers.0.proj.weight"
    assert_same_merge(runs["a"][name], runs["b"][name], name)  # same seed, other block size
    assert not torch.equal(runs["a"][name], runs["c"][name])
    W32 = expected_merge(base_t[name], ad[f"{PFX}model.layers.0.proj.lora_A.weight"],
                         ad[f"{PFX}model.layers.0.proj.lora_B.weight"], 2.0)
    assert runs["a"][name].dtype == torch.bfloat16
    assert ((runs["a"][name].double() - W32.double()).abs() <= ulp(runs["a"][name])).all()
    assert torch.equal(runs["a"]["model.embed.weight"], base_t["model.embed.weight"].bfloat16())
    assert torch.equal(runs["a"]["model.position_ids"], base_t["model.position_ids"])
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in base_t.values())


# ------------------------------------------------------------------------ refusals
def _corrupt(kind: str, base: Path, adapter: Path, out: Path, gen):
    """Make one thing wrong; return (extra CLI args, message regex)."""
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    ad_path = adapter / "adapter_model.safetensors"
    cfg_path = adapter / "adapter_config.json"
    if kind == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return [], "exists; pass --overwrite"
    if kind == "out_inside_base":
        return ["--overwrite"], "overlaps BASE"
    if kind == "base_pickle":
        for p in list(base.glob("model*")):
            p.unlink()
        (base / "pytorch_model.bin").write_bytes(b"\x80\x04")
        return [], "pickle weights"
    if kind == "adapter_pickle":
        ad_path.rename(adapter / "adapter_model.bin")
        return [], "pickle is never read"
    if kind in ("index_absolute", "index_dotdot"):
        shard = next(iter(index["weight_map"].values()))
        bad = str(base / shard) if kind == "index_absolute" else f"../{base.name}/{shard}"
        index["weight_map"] = {k: bad if v == shard else v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        return [], "absolute path" if kind == "index_absolute" else "leaves BASE"
    if kind == "index_inconsistent":
        index["weight_map"].pop("model.embed.weight")
        index_path.write_text(json.dumps(index))
        return [], "places elsewhere or not at all"
    if kind == "truncated_shard":
        shard = base / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-8])
        return [], "header describes"
    t = load_file(ad_path)
    cfg = json.loads(cfg_path.read_text())
    if kind == "key_no_match":
        t[f"{PFX}model.layers.7.proj.lora_A.weight"] = torch.randn(R, IN_F)
        t[f"{PFX}model.layers.7.proj.lora_B.weight"] = torch.randn(OUT_F, R)
        msg = "match no base tensor"
    elif kind == "shape_mismatch":
        t[f"{PFX}model.layers.1.proj.lora_A.weight"] = torch.randn(R, IN_F + 1)
        msg = "shape mismatch"
    elif kind == "rank_mismatch":
        cfg["rank_pattern"] = {"layers.1.proj": 8}
        msg = "rank r=8"
    elif kind == "non_finite":
        t[f"{PFX}model.layers.1.proj.lora_B.weight"][3, 1] = float("nan")
        msg = "non-finite"
    elif kind == "overflow":  # finite factors, inf product: found while writing, cleaned up
        t[f"{PFX}model.layers.1.proj.lora_B.weight"].fill_(3e38)
        msg = "gives non-finite values"
    elif kind == "missing_lora_B":
        del t[f"{PFX}model.layers.1.proj.lora_B.weight"]
        msg = "needs exactly one"
    elif kind == "lora_bias_no_base_bias":
        cfg["lora_bias"] = True
        for layer in (0, 1):
            t[f"{PFX}model.layers.{layer}.proj.lora_B.bias"] = torch.randn(OUT_F)
        msg = "layers.1.proj.bias"
    elif kind == "int_weight":
        t[f"{PFX}model.layers.1.q8.lora_A.weight"] = torch.randn(R, IN_F)
        t[f"{PFX}model.layers.1.q8.lora_B.weight"] = torch.randn(OUT_F, R)
        msg = "integer or quantised"
    elif kind == "not_lora":
        cfg["peft_type"] = "LOHA"
        msg = "only LORA"
    elif kind == "dora_no_magnitude":
        cfg["use_dora"] = True
        msg = "lora_magnitude_vector is missing"
    else:
        raise AssertionError(kind)
    save_file(t, ad_path)
    cfg_path.write_text(json.dumps(cfg))
    return [], msg


REFUSALS = ["out_exists", "out_inside_base", "base_pickle", "adapter_pickle", "index_absolute",
            "index_dotdot", "index_inconsistent", "truncated_shard", "key_no_match",
            "shape_mismatch", "rank_mismatch", "non_finite", "overflow", "missing_lora_B",
            "lora_bias_no_base_bias", "int_weight", "not_lora", "dora_no_magnitude"]


@pytest.mark.parametrize("kind", REFUSALS)
def test_refusals_write_nothing(tmp_path, gen, kind, capsys):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_sharded(base, gen)
    write_adapter(adapter, gen)
    out = base / "merged" if kind == "out_inside_base" else tmp_path / "out"
    extra, message = _corrupt(kind, base, adapter, out, gen)
    before = tree_digest(base), tree_digest(adapter), tree_digest(out) if out.exists() else None
    rc = cli_main(["merge", str(base), str(adapter), str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lorasc merge: error:" in err
    assert re.search(message, err), err
    after = tree_digest(base), tree_digest(adapter), tree_digest(out) if out.exists() else None
    assert after == before
    assert leftovers(tmp_path) == [] and leftovers(base) == []


def test_dora_zero_norm_refused_before_writing(tmp_path, gen):
    base_t = write_sharded(tmp_path / "base", gen)
    mod = f"{PFX}model.layers.0.proj"
    W = base_t["model.layers.0.proj.weight"]
    # B @ A = -W on row 5 exactly: A = W's row as rank-1 factor, B picks row 5
    A = torch.zeros(R, IN_F)
    A[0] = W[5]
    B = torch.zeros(OUT_F, R)
    B[5, 0] = -0.5  # scaling 2 * (-0.5) = -1
    write_adapter(tmp_path / "adapter", gen, {
        f"{mod}.lora_A.weight": A, f"{mod}.lora_B.weight": B,
        f"{mod}.lora_magnitude_vector": torch.ones(OUT_F)}, use_dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------- overwrite and atomicity
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_refused_without_cuda(tmp_path, gen, capsys):
    write_sharded(tmp_path / "base", gen)
    write_adapter(tmp_path / "adapter", gen)
    rc = cli_main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                   str(tmp_path / "out"), "--device", "cuda"])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overwrite_replaces_out(tmp_path, gen):
    write_sharded(tmp_path / "base", gen)
    write_adapter(tmp_path / "adapter", gen)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc = cli_main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(out),
                   "--no-progress", "--overwrite", "--device", DEVICE.type])
    assert rc == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_interrupted_merge_leaves_no_out(tmp_path, gen, monkeypatch, exc, existing):
    write_sharded(tmp_path / "base", gen)
    write_adapter(tmp_path / "adapter", gen)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "previous.txt").write_text("previous merge")
    before = tree_digest(tmp_path / "base"), tree_digest(tmp_path / "adapter")
    real, calls = cm.output_blocks, []

    def failing(plan, *args, **kw):
        calls.append(plan.name)
        if len(calls) == 4:  # the second shard, after the first was written completely
            raise exc("injected failure")
        yield from real(plan, *args, **kw)

    monkeypatch.setattr(cm, "output_blocks", failing)
    with pytest.raises(exc, match="injected"):
        merge(tmp_path / "base", tmp_path / "adapter", out, overwrite=existing)
    assert len(calls) == 4
    if existing:
        assert sorted(os.listdir(out)) == ["previous.txt"]
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []
    assert (tree_digest(tmp_path / "base"), tree_digest(tmp_path / "adapter")) == before


def test_single_file_output_loads_with_safetensors(tmp_path, gen):
    base, adapter, _, _ = peft_pair(tmp_path, gen, llama, LLAMA_CASES["lora"])
    rc = cli_main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--no-progress",
                   "--device", DEVICE.type, "--dtype", "float16"])
    assert rc == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.metadata()["lorasc_merge.dtype"] == "float16"
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype in (torch.float16, torch.float32)


def test_scalar_replacement_and_empty_tensors(tmp_path, gen):
    """A 0-d tensor replaced from the adapter (a modules_to_save scalar) and zero-length
    tensors pass through the row-block writer."""
    base = tmp_path / "base"
    base.mkdir()
    W = torch.randn(OUT_F, IN_F, generator=gen)
    save_file({"model.layers.0.proj.weight": W, "model.layers.0.gate": torch.tensor(0.5),
               "model.empty": torch.empty(0, 3)}, base / "model.safetensors")
    a, b = torch.randn(R, IN_F, generator=gen), torch.randn(OUT_F, R, generator=gen)
    write_adapter(tmp_path / "adapter", gen, tensors={
        f"{PFX}model.layers.0.proj.lora_A.weight": a, f"{PFX}model.layers.0.proj.lora_B.weight": b,
        f"{PFX}model.layers.0.gate": torch.tensor(2.0)})
    merge(base, tmp_path / "adapter", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["model.layers.0.gate"].dim() == 0 and out["model.layers.0.gate"].item() == 2.0
    assert out["model.empty"].shape == (0, 3)
    assert_same_merge(out["model.layers.0.proj.weight"], expected_merge(W, a, b, 2.0),
                      "model.layers.0.proj.weight")
