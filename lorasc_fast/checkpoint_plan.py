"""What ``lorasc merge`` will do to each base tensor, decided (and every check made) before
anything is written.

Key mapping. A PEFT module path is relative to the model PEFT wrapped (``LlamaForCausalLM``:
``model.layers.0.self_attn.q_proj``); a checkpoint may have been saved from that class or from
its bare backbone (``layers.0...``), or the other way round. One rule is applied to every
adapter name: as is; or one leading component dropped where present (``model.``); or one
leading component of the base's names added. The first rule, if it matches every adapter
name, wins; otherwise exactly one of the others must match all of them, else the merge is
refused (nothing is guessed key by key).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .checkpoint_adapter import KEY_PREFIX, Adapter, LoraModule
from .checkpoint_base import BaseCheckpoint
from .checkpoint_errors import MergeError
from .checkpoint_safetensors import DTYPES, FLOAT_DTYPES, NAMES, TensorInfo

MERGEABLE = ("F32", "F16", "BF16")  # W dtypes the fused ops merge into
OUT_DTYPES = {"keep": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class TensorPlan:
    """One output tensor: read ``info`` from ``shard`` (or take ``replace`` from the adapter),
    merge ``module``'s weight delta or ``bias_of``'s lora bias into it, write it as ``out_dtype``.
    ``seed`` keys its stochastic rounding; ``dora_norm`` (||W + sBA|| per output feature) is
    filled in by the norm pass before writing."""

    name: str
    shard: str
    info: TensorInfo
    out_dtype: str
    seed: int
    replace: torch.Tensor | None = None
    module: LoraModule | None = None
    bias_of: LoraModule | None = None
    dora_norm: torch.Tensor | None = None

    @property
    def touched(self) -> bool:
        return self.replace is not None or self.module is not None or self.bias_of is not None

    @property
    def out_nbytes(self) -> int:
        return self.info.numel * DTYPES[self.out_dtype].itemsize


def tensor_seed(seed: int, name: str) -> int:
    """A 64-bit stream seed per tensor, so no two tensors share stochastic-rounding draws."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def _rules(adapter_names: list[str], base_names: set[str]):
    """The renaming rules tried when the names do not match as they are: (label, function)."""
    firsts = lambda names: sorted({n.split(".", 1)[0] for n in names if "." in n})  # noqa: E731
    for p in firsts(adapter_names):
        yield f"drop leading '{p}.'", lambda n, p=p + ".": n[len(p):] if n.startswith(p) else n
    for p in firsts(base_names):
        yield f"add leading '{p}.'", lambda n, p=p + ".": p + n


def resolve_names(wanted: dict[str, str], base_names: set[str]) -> dict[str, str]:
    """Map each adapter parameter name (``wanted``: name -> adapter key, for messages) to a base
    tensor name by the one rule that matches all of them."""
    if all(n in base_names for n in wanted):
        return {n: n for n in wanted}
    working = [(label, f) for label, f in _rules(list(wanted), base_names)
               if all(f(n) in base_names for n in wanted)]
    if len(working) > 1:
        raise MergeError("adapter keys map onto the base in more than one way ("
                         + "; ".join(label for label, _ in working) + "); refusing to guess")
    if not working:
        missing = [n for n in wanted if n not in base_names]
        shown = ", ".join(f"{wanted[n]!r} (looked for {n!r})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MergeError(f"adapter keys match no base tensor: {shown}{more}")
    f = working[0][1]
    mapped = {n: f(n) for n in wanted}
    if len(set(mapped.values())) != len(mapped):
        raise MergeError("two adapter keys map onto the same base tensor")
    return mapped


def _check_weight(module: LoraModule, info: TensorInfo, key: str) -> None:
    if info.dtype not in MERGEABLE:
        raise MergeError(f"cannot merge {key!r} into base tensor {info.name!r} of dtype "
                         f"{info.dtype} (only F32/F16/BF16; integer or quantised weights are "
                         "refused)")
    if info.shape != module.weight_shape:
        layout = "in x out, fan_in_fan_out" if module.fan_in_fan_out else "out x in"
        raise MergeError(f"shape mismatch: base tensor {info.name!r} is {list(info.shape)}, "
                         f"adapter module {key!r} needs {list(module.weight_shape)} ({layout})")


def plan_merge(base: BaseCheckpoint, adapter: Adapter, dtype: str = "keep",
               seed: int = 0) -> dict[str, TensorPlan]:
    """A TensorPlan per base tensor (in shard, then data order); raises MergeError on any
    mismatch between adapter and base."""
    if dtype not in OUT_DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}")
    target = OUT_DTYPES[dtype]
    plans = {}
    for rel, header in base.shards.items():
        for name, info in header.tensors.items():
            out = target if target and info.dtype in FLOAT_DTYPES else info.dtype
            plans[name] = TensorPlan(name, rel, info, out, tensor_seed(seed, name))

    wanted: dict[str, str] = {}
    for path, m in adapter.modules.items():
        kind = "lora_embedding_A" if m.embedding else "lora_A.weight"
        wanted[f"{path}.weight"] = f"{KEY_PREFIX}{path}.{kind}"
        if m.bias is not None:
            wanted[f"{path}.bias"] = f"{KEY_PREFIX}{path}.lora_B.bias"
    mapped = resolve_names({**adapter.keys, **wanted}, set(plans))

    for param, t in adapter.full.items():
        p = plans[mapped[param]]
        if tuple(t.shape) != p.info.shape:
            raise MergeError(f"shape mismatch: adapter tensor {adapter.keys[param]!r} is "
                             f"{list(t.shape)}, base tensor {p.name!r} is {list(p.info.shape)}")
        if p.info.dtype not in FLOAT_DTYPES and t.dtype != p.info.torch_dtype:
            raise MergeError(f"adapter tensor {adapter.keys[param]!r} ({NAMES[t.dtype]}) cannot "
                             f"replace base tensor {p.name!r} of dtype {p.info.dtype}")
        p.replace = t
    for path, m in adapter.modules.items():
        key = wanted[f"{path}.weight"]
        p = plans[mapped[f"{path}.weight"]]
        _check_weight(m, p.info, key)
        p.module = m
        if m.bias is not None:
            pb = plans[mapped[f"{path}.bias"]]
            if pb.info.dtype not in MERGEABLE or pb.info.shape != (m.out_features,):
                raise MergeError(f"shape mismatch: lora_B.bias of {KEY_PREFIX}{path} needs a float "
                                 f"base bias of shape [{m.out_features}], {pb.name!r} is "
                                 f"{pb.info.dtype} {list(pb.info.shape)}")
            pb.bias_of = m
    return plans
