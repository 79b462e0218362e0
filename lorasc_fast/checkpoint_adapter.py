"""A saved PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), read
and checked for ``lorasc merge``.

PEFT saves keys as ``base_model.model.<module path>.<param>`` with the adapter name removed
(``peft.utils.save_and_load.get_peft_model_state_dict``):

* ``<m>.lora_A.weight`` (r x in), ``<m>.lora_B.weight`` (out x r), optional ``<m>.lora_B.bias``
  (``lora_bias``) and ``<m>.lora_magnitude_vector`` (DoRA, length out) for Linear / Conv1D;
* ``<m>.lora_embedding_A`` (r x num_embeddings), ``<m>.lora_embedding_B`` (dim x r) for Embedding,
  whose delta is ``(B @ A)^T``;
* anything else is a full tensor that PEFT loads over the base one: ``modules_to_save`` copies,
  trained biases (``bias="all"|"lora_only"``) and saved embeddings, the latter two stored as
  ``<m>.base_layer.<param>``, meaning ``<m>.<param>``.

Scaling per module: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where
``r`` and ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` matched as PEFT does
(``peft.utils.other.get_pattern_key``: first key ``k`` with ``(.*\\.)?(k)$`` matching the path).
Memory: the whole adapter, factors in fp32.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_errors import MergeError
from .checkpoint_safetensors import load_json, read_header, read_tensor

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
               "lora_embedding_A", "lora_embedding_B")
# LoraConfig fields that change what a merge means and that this merge does not implement.
UNSUPPORTED = ("use_qalora", "target_parameters", "trainable_token_indices", "layer_replication",
               "alora_invocation_tokens", "use_bdlora", "arrow_config", "velora_config",
               "monteclora_config", "kasa_config", "megatron_config")


@dataclass
class LoraModule:
    """One adapted module: ``W += scaling * B @ A`` (transposed when ``fan_in_fan_out``), then
    for DoRA ``W = magnitude * W / ||W||_row``; ``bias += scaling * lora_bias``."""

    path: str
    embedding: bool
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The stored base weight's shape: out x in, or in x out for fan_in_fan_out."""
        out_f, in_f = self.B.shape[0], self.A.shape[1]
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)


@dataclass
class Adapter:
    """``modules`` by module path; ``full`` replacement tensors by parameter path (``key`` gives
    each one's original key, for messages); hashes of the two files, for the merge record."""

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor]
    keys: dict[str, str]
    sha256: str
    config_sha256: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pattern_value(pattern: dict, path: str, default):
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of ``path``."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as e:
            raise MergeError(f"rank/alpha pattern {key!r} is not a valid regex ({e})") from None
    return default


def _check_config(path: Path) -> dict:
    cfg = load_json(path / CONFIG)
    if not isinstance(cfg, dict):
        raise MergeError(f"{path / CONFIG}: not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise MergeError(f"{path / CONFIG}: peft_type is {cfg.get('peft_type')!r}; only LORA "
                         "adapters (incl. rsLoRA, DoRA) can be merged")
    for field in UNSUPPORTED:
        if cfg.get(field) not in (None, False, {}, []):
            raise MergeError(f"{path / CONFIG}: {field}={cfg[field]!r} is not supported by "
                             "lorasc merge")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise MergeError(f"{path / CONFIG}: {field} must be a positive number")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(field) or {}, dict):
            raise MergeError(f"{path / CONFIG}: {field} must be an object")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.tensors.items():
            t = read_tensor(f, header, info)
            if not t.is_floating_point():
                raise MergeError(f"{path}: tensor {name!r} has non-float dtype {info.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise MergeError(f"{path}: tensor {name!r} has non-finite values (NaN/Inf)")
            out[name] = t
    return out


def _split_key(key: str) -> tuple[str, str | None, str]:
    """``(module path, lora role or None, param path for full tensors)`` of a saved key."""
    if not key.startswith(KEY_PREFIX):
        raise MergeError(f"adapter key {key!r} does not start with {KEY_PREFIX!r}; not a PEFT "
                         "LoRA adapter saved by save_pretrained")
    rest = key[len(KEY_PREFIX):]
    for suffix in LORA_PARAMS:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix, rest
    parts = rest.split(".")
    if any(p.startswith("lora_") for p in parts) or "token_adapter" in parts:
        raise MergeError(f"adapter key {key!r} is a LoRA parameter lorasc merge does not support")
    if len(parts) >= 2 and parts[-2] == "base_layer":
        parts = parts[:-2] + parts[-1:]
    return ".".join(parts[:-1]), None, ".".join(parts)


def _build_module(path: str, params: dict[str, torch.Tensor], cfg: dict) -> LoraModule:
    where = f"adapter module {KEY_PREFIX}{path}"
    embedding = "lora_embedding_A" in params or "lora_embedding_B" in params
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else \
        ("lora_A.weight", "lora_B.weight")
    if a_key not in params or b_key not in params or (embedding and (
            "lora_A.weight" in params or "lora_B.weight" in params)):
        raise MergeError(f"{where}: needs exactly one {a_key} and one {b_key} "
                         f"(has {sorted(params)})")
    A, B = params[a_key].float(), params[b_key].float()
    if A.dim() != 2 or B.dim() != 2:
        raise MergeError(f"{where}: LoRA factors of shapes {tuple(A.shape)}, {tuple(B.shape)} "
                         "are not matrices (conv LoRA is not supported)")
    r = pattern_value(cfg.get("rank_pattern") or {}, path, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, path, cfg["lora_alpha"])
    if not (A.shape[0] == B.shape[1] == r):
        raise MergeError(f"{where}: shape mismatch: lora_A {tuple(A.shape)} and lora_B "
                         f"{tuple(B.shape)} do not both have rank r={r} from adapter_config.json")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    module = LoraModule(path, embedding, A, B, scaling,
                        fan_in_fan_out=embedding or bool(cfg.get("fan_in_fan_out")))
    magnitude, bias = params.get("lora_magnitude_vector"), params.get("lora_B.bias")
    if bool(cfg.get("use_dora")) != (magnitude is not None) and not embedding:
        raise MergeError(f"{where}: use_dora={cfg.get('use_dora')} but lora_magnitude_vector is "
                         f"{'present' if magnitude is not None else 'missing'}")
    if embedding and (magnitude is not None or bias is not None):
        raise MergeError(f"{where}: DoRA / lora_bias on an embedding is not supported")
    if bool(cfg.get("lora_bias")) != (bias is not None) and not embedding:
        raise MergeError(f"{where}: lora_bias={cfg.get('lora_bias')} but lora_B.bias is "
                         f"{'present' if bias is not None else 'missing'}")
    for name, vec in (("lora_magnitude_vector", magnitude), ("lora_B.bias", bias)):
        if vec is not None and tuple(vec.shape) != (module.out_features,):
            raise MergeError(f"{where}: shape mismatch: {name} is {tuple(vec.shape)}, "
                             f"expected ({module.out_features},)")
    module.magnitude = None if magnitude is None else magnitude.float()
    module.bias = None if bias is None else bias.float()
    return module


def load_adapter(path) -> Adapter:
    """Read and check ADAPTER; raise MergeError on anything that would not merge cleanly."""
    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"ADAPTER {path} is not a directory")
    if not (path / WEIGHTS).is_file():
        pickles = [p.name for p in path.glob("adapter_model.*") if p.suffix != ".safetensors"]
        hint = f" (found {', '.join(pickles)}: pickle is never read)" if pickles else ""
        raise MergeError(f"{path} holds no {WEIGHTS}{hint}; only safetensors adapters are read")
    if not (path / CONFIG).is_file():
        raise MergeError(f"{path} holds no {CONFIG}")
    cfg = _check_config(path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    full, keys = {}, {}
    for key, t in _read_tensors(path / WEIGHTS).items():
        module, role, param = _split_key(key)
        if role is None:
            if param in full:
                raise MergeError(f"adapter keys {keys[param]!r} and {key!r} both replace {param!r}")
            full[param], keys[param] = t, key
        else:
            grouped.setdefault(module, {})[role] = t
    modules = {m: _build_module(m, params, cfg) for m, params in grouped.items()}
    if not modules and not full:
        raise MergeError(f"{path / WEIGHTS} holds no tensors")
    return Adapter(path, cfg, modules, full, keys, _sha256(path / WEIGHTS), _sha256(path / CONFIG))
