"""Make PEFT's LoRA ``Linear`` layers merge with the fused in-place ops.

``patch_peft()`` replaces ``merge``, ``unmerge`` and ``get_delta_weight`` of
``peft.tuners.lora.layer.Linear`` (``nn.Linear`` and transformers ``Conv1D`` bases, the
latter through ``fan_in_fan_out``); ``merge_and_unload`` / ``merge_adapter`` /
``unmerge_adapter`` call those methods, so they follow. ``unpatch_peft()`` puts the
original functions back.

What changes, per adapter (s = ``scaling[adapter]``):

* plain LoRA (LoRA, rsLoRA, ``lora_bias``): merge is ``merge_(W, A, B, scale=s)``,
  unmerge ``merge_(W, A, B, scale=-s)``, in place - no ``out x in`` temporary (PEFT's
  own merge peaks at 2x W's size, its safe merge at ~3.75x, DoRA at 4-5x);
* DoRA: PEFT's ``dora_factor = magnitude / ||W_base + s B A||``, ``W <- dora_factor (W + s B A)``
  with the norm taken, as in PEFT, on the weight with the other merged adapters taken
  out; the norm is cached under PEFT's own key, and unmerge is
  ``W <- W / dora_factor - s B A`` (``dora_weight_norm``, ``dora_merge_``, ``dora_unmerge_``);
* non-finite input is refused before anything of the adapter is written: the fused ops
  refuse NaN or Inf in A, B and the magnitude (``validation.NonFiniteError``), the patch
  the DoRA factor and ``lora_bias``;
* ``safe_merge=True``: also a read-only pass over W in row chunks that rounds the merged
  values to W's dtype (``torch_path.merged_finite``); any refusal raises PEFT's
  ``ValueError("NaNs detected in the merged weights. ...")`` with W untouched;
* ``get_delta_weight`` still returns the delta (callers asked for it): one ``out x in``
  tensor written by ``merge_`` into zeros; with autograd on and trainable factors it is
  PEFT's own (differentiable) method. merge/unmerge never call it;
* ``lora_bias`` on a layer without bias raises PEFT's RuntimeError before anything is
  written (PEFT's unsafe path merges the weight first).

Everything else is PEFT's own code, called unchanged: layers whose weight is not a plain
2-D float32/float16/bfloat16 tensor (quantised, meta, DTensor), subclasses overriding
``get_delta_weight``, variants other than DoRA, adapters on another device, and
non-finite adapters in an unsafe merge (PEFT merges the NaNs; so does the patch).
The arithmetic is fp32 with one rounding to W's dtype per merge step, so merged weights
agree with PEFT's to rounding (bf16/fp16 weights: one ulp per step, mostly bit-equal).
"""
from __future__ import annotations

import warnings

import torch

from . import ops, torch_path
from . import validation as v
from .dora import dora_merge_, dora_unmerge_, dora_weight_norm

__all__ = ["patch_peft", "unpatch_peft", "is_patched"]

_METHODS = ("merge", "unmerge", "get_delta_weight")
_ORIGINAL: dict = {}  # method name -> the attribute found in Linear.__dict__
_STATE = {"backend": None}


def _nan_error(adapter: str) -> ValueError:
    return ValueError(
        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")


def _linear_cls():
    from peft.tuners.lora.layer import Linear
    return Linear


def _dora_cls():
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # pragma: no cover - PEFT without LoRA variants
        return None
    return DoraLinearVariant


def _norm_from_unmerged(layer) -> bool:
    """PEFT with ``_unmerged_base_weight`` (0.21 has it) takes the DoRA norm from the weight
    without the other merged adapters; older PEFT from the weight as it is."""
    return hasattr(layer, "_unmerged_base_weight")


# ----------------------------------------------------------------------------- support

def _weight(layer):
    return layer.get_base_layer().weight


def _is_dora(layer, adapter) -> bool:
    """On a supported layer the only variant is DoRA (``_adapter_supported``)."""
    return layer.lora_variant.get(adapter) is not None


def _layer_supported(layer) -> bool:
    if type(layer).get_delta_weight is not _get_delta_weight or not hasattr(layer, "lora_variant"):
        return False
    W = getattr(layer.get_base_layer(), "weight", None)
    return (isinstance(W, torch.Tensor) and type(W.data) is torch.Tensor
            and W.dtype in v.WEIGHT_DTYPES and W.dim() == 2 and W.device.type != "meta")


def _factors_supported(layer, adapter, device) -> bool:
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    shape = (A.shape[1], B.shape[0]) if layer.fan_in_fan_out else (B.shape[0], A.shape[1])
    return (A.dtype in v.FACTOR_DTYPES and B.dtype in v.FACTOR_DTYPES
            and A.device == device == B.device and A.dim() == 2 and B.dim() == 2
            and A.shape[0] == B.shape[1] and tuple(_weight(layer).shape) == shape)


def _adapter_supported(layer, adapter) -> bool:
    if adapter not in layer.lora_A:
        return True  # PEFT skips it
    W = _weight(layer)
    if not _factors_supported(layer, adapter, W.device):
        return False
    variant = layer.lora_variant.get(adapter)
    if variant is None:
        return True
    dora = _dora_cls()
    if dora is None or type(variant) is not dora:
        return False
    m = layer.lora_magnitude_vector[adapter].weight
    out_f = layer.lora_B[adapter].weight.shape[0]
    return m.dtype in v.FACTOR_DTYPES and m.device == W.device and tuple(m.shape) == (out_f,)


def _supported(layer, adapters) -> bool:
    return _layer_supported(layer) and all(
        _adapter_supported(layer, a) for a in [*adapters, *layer.merged_adapters])


# ----------------------------------------------------------------------------- checks
# The fused ops refuse non-finite A, B and magnitude (``validation.NonFiniteError``) before
# they write anything; the patch checks only what they do not see (here, and ``_lora_bias``).

def _check_dora_factor(m, weight_norm) -> torch.Tensor:
    """PEFT's ``dora_factor = magnitude / weight_norm`` (fp32, length out), refused unless finite.

    The DoRA ops refuse a zero norm only as a plain ValueError; here it is a
    ``NonFiniteError`` like every other non-finite input, and the safe dry run needs it.
    """
    factor = m.float() / weight_norm.float()
    v.check_finite(**{"magnitude / weight_norm": factor})
    return factor


def _check_merged(W, A, B, scale, fan_in_fan_out, post=None) -> None:
    """Safe merge's dry run: refuse unless ``post * (W + scale B A)`` is finite in W's dtype.

    W is only read, in the torch path's row chunks (``torch_path.merged_finite``).
    """
    if not torch_path.merged_finite(W, A, B, scale=scale, fan_in_fan_out=fan_in_fan_out,
                                    post=post):
        raise v.NonFiniteError("the merged weight has NaN or Inf in its dtype")


# ----------------------------------------------------------------------------- merging

def _parts(layer, adapter):
    A = layer.lora_A[adapter].weight.detach()
    B = layer.lora_B[adapter].weight.detach()
    return _weight(layer).data, A, B, float(layer.scaling[adapter]), bool(layer.fan_in_fan_out)


def _lora_bias(layer, adapter):
    """``s * lora_B.bias`` when the adapter has one (the base layer must have a bias),
    refused (``NonFiniteError``) unless finite; the ops never see it."""
    if not layer.lora_bias.get(adapter, False):
        return None
    if getattr(layer.get_base_layer(), "bias", None) is None:
        raise RuntimeError(
            "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
    bias_delta = layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]
    v.check_finite(lora_bias=bias_delta)
    return bias_delta


def _merge_lora(layer, adapter, safe_merge) -> None:
    """``W += s B A`` and ``bias += s lora_B.bias`` in place; non-finite input raises
    ``NonFiniteError`` before anything is written."""
    W, A, B, s, fifo = _parts(layer, adapter)
    bias_delta = _lora_bias(layer, adapter)
    if safe_merge:
        _check_merged(W, A, B, s, fifo)
        if bias_delta is not None:
            v.check_finite(**{"bias + lora_bias": layer.get_base_layer().bias.data + bias_delta})
    ops.merge_(W, A, B, scale=s, fan_in_fan_out=fifo, backend=_STATE["backend"])
    if bias_delta is not None:
        layer.get_base_layer().bias.data += bias_delta


def _merge_dora(layer, adapter, safe_merge, weight_norm) -> None:
    """``W <- dora_factor (W + s B A)`` in place with PEFT's ``weight_norm`` (None: the norm
    of ``W + s B A`` itself), cached for the unmerge; non-finite input raises
    ``NonFiniteError`` before anything is written."""
    W, A, B, s, fifo = _parts(layer, adapter)
    m = layer.lora_magnitude_vector[adapter].weight.detach()
    backend = _STATE["backend"]
    if weight_norm is None:
        weight_norm = dora_weight_norm(W, A, B, scale=s, fan_in_fan_out=fifo, backend=backend)
    factor = _check_dora_factor(m, weight_norm)
    if safe_merge:
        _check_merged(W, A, B, s, fifo, factor)
    dora_merge_(W, A, B, m, scale=s, fan_in_fan_out=fifo, weight_norm=weight_norm,
                backend=backend)
    layer._cache_store(f"{adapter}-weight_norm", weight_norm)


def _merge_one(layer, adapter, safe_merge, weight_norm=None) -> None:
    """Merge one adapter on the fused ops. If they refuse it as non-finite (nothing was
    written), a safe merge raises PEFT's error and an unsafe one is PEFT's own code (which
    merges the NaNs)."""
    try:
        if _is_dora(layer, adapter):
            _merge_dora(layer, adapter, safe_merge, weight_norm)
        else:
            _merge_lora(layer, adapter, safe_merge)
        layer.merged_adapters.append(adapter)
        return
    except v.NonFiniteError as e:
        if safe_merge:
            raise _nan_error(adapter) from e
    _ORIGINAL["merge"](layer, safe_merge=False, adapter_names=[adapter])


def _merge_dora_after_others(layer, adapter, safe_merge) -> None:
    """PEFT's ``_unmerged_base_weight`` without its copy of W: unmerge the merged
    adapters in place, take every DoRA norm that the re-merge and the new adapter need
    from the bare weight, merge them all back, then the new adapter."""
    previous = list(layer.merged_adapters)
    _unmerge(layer)
    W = _weight(layer).data
    norms = {}
    for name in [*previous, adapter]:
        if name in layer.lora_A and _is_dora(layer, name):
            _, A, B, s, fifo = _parts(layer, name)
            try:
                norms[name] = dora_weight_norm(W, A, B, scale=s, fan_in_fan_out=fifo,
                                               backend=_STATE["backend"])
            except v.NonFiniteError:
                pass  # no norm: _merge_one meets the same refusal and handles it
    for name in previous:  # as PEFT: names no longer in the layer are dropped
        if name in layer.lora_A:
            _merge_one(layer, name, safe_merge, norms.get(name))
    _merge_one(layer, adapter, safe_merge, norms.get(adapter))


def _unmerge_fused(layer, adapter) -> None:
    """PEFT's unmerge of one adapter in place (``W -= s B A``, DoRA:
    ``W <- W / dora_factor - s B A`` with the cached norm); non-finite input raises
    ``NonFiniteError`` before anything is written."""
    W, A, B, s, fifo = _parts(layer, adapter)
    backend = _STATE["backend"]
    bias_delta = _lora_bias(layer, adapter)
    if _is_dora(layer, adapter):
        m = layer.lora_magnitude_vector[adapter].weight.detach()
        key = f"{adapter}-weight_norm"
        _check_dora_factor(m, layer._caches[key])
        dora_unmerge_(W, A, B, m, layer._caches[key], scale=s, fan_in_fan_out=fifo,
                      backend=backend)
        layer._cache_pop(key)
    else:
        ops.merge_(W, A, B, scale=-s, fan_in_fan_out=fifo, backend=backend)
    if bias_delta is not None:
        layer.get_base_layer().bias.data -= bias_delta


def _unmerge_one(layer, adapter) -> None:
    """Unmerge one adapter on the fused ops; one they refuse as non-finite (nothing was
    written) is unmerged by PEFT's own code, for this adapter alone."""
    try:
        return _unmerge_fused(layer, adapter)
    except v.NonFiniteError:
        pass  # nothing was written
    rest = list(layer.merged_adapters)
    layer.merged_adapters[:] = [adapter]
    try:
        _ORIGINAL["unmerge"](layer)
    finally:
        layer.merged_adapters[:] = rest


def _unmerge(layer) -> None:
    while layer.merged_adapters:
        adapter = layer.merged_adapters.pop()
        if adapter in layer.lora_A:
            _unmerge_one(layer, adapter)


# ----------------------------------------------------------------------------- the methods

def _merge(self, safe_merge: bool = False, adapter_names=None) -> None:
    """PEFT's ``Linear.merge`` on the fused in-place ops (see ``lorasc_fast.peft_patch``)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge
    candidates = self.active_adapters if adapter_names is None else adapter_names
    if isinstance(candidates, str) or not _supported(self, candidates):
        return _ORIGINAL["merge"](self, safe_merge=safe_merge, adapter_names=adapter_names)
    with torch.no_grad():
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            if _is_dora(self, adapter) and self.merged_adapters and _norm_from_unmerged(self):
                _merge_dora_after_others(self, adapter, safe_merge)
            else:
                _merge_one(self, adapter, safe_merge)


def _unmerge_method(self) -> None:
    """PEFT's ``Linear.unmerge`` on the fused in-place ops (see ``lorasc_fast.peft_patch``)."""
    if not _supported(self, []):
        return _ORIGINAL["unmerge"](self)
    if not self.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    with torch.no_grad():
        _unmerge(self)


def _get_delta_weight(self, adapter) -> torch.Tensor:
    """PEFT's ``Linear.get_delta_weight``, written by ``merge_`` into one zero tensor
    (non-finite factors, which ``merge_`` refuses, go to PEFT's own method)."""
    A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    differentiable = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)
    if (differentiable or A.dtype not in v.FACTOR_DTYPES or B.dtype not in v.FACTOR_DTYPES
            or A.device != B.device or A.dim() != 2 or B.dim() != 2):
        return _ORIGINAL["get_delta_weight"](self, adapter)
    out_f, in_f = B.shape[0], A.shape[1]
    shape = (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)
    try:
        return ops.merge_(
            torch.zeros(shape, dtype=torch.promote_types(A.dtype, B.dtype), device=B.device),
            A.detach(), B.detach(), scale=float(self.scaling[adapter]),
            fan_in_fan_out=bool(self.fan_in_fan_out), backend=_STATE["backend"])
    except v.NonFiniteError:
        pass  # the zeros are freed before PEFT's method allocates its own
    return _ORIGINAL["get_delta_weight"](self, adapter)


_PATCHED = {"merge": _merge, "unmerge": _unmerge_method, "get_delta_weight": _get_delta_weight}


# ----------------------------------------------------------------------------- public

def patch_peft(*, backend=None) -> None:
    """Route PEFT LoRA ``Linear`` merge/unmerge/get_delta_weight through the fused ops.

    Idempotent; calling it again only changes ``backend`` (None: Triton on CUDA, the
    memory-lean torch path elsewhere; or "triton", "torch", "reference").
    """
    v.check_backend(backend)
    Linear = _linear_cls()
    _STATE["backend"] = backend
    if _ORIGINAL:
        return
    for name in _METHODS:
        _ORIGINAL[name] = Linear.__dict__[name]
        setattr(Linear, name, _PATCHED[name])


def unpatch_peft() -> None:
    """Put PEFT's original methods back (no-op when not patched)."""
    if not _ORIGINAL:
        return
    Linear = _linear_cls()
    for name in _METHODS:
        setattr(Linear, name, _ORIGINAL.pop(name))
    _STATE["backend"] = None


def is_patched() -> bool:
    return bool(_ORIGINAL)
