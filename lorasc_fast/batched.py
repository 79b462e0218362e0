"""A whole-model cascade boundary in one call: ``cascade_merge_many_``.

Same math as calling ``cascade_merge_`` on every layer, scheduled for throughput. With
the Triton backend (contiguous factors) the whole boundary is a handful of launches
(``kernels/cascade_group.py``): grouped moments of every layer's EMA'd slow product, one
EMA launch per (slow, fast) dtype pair, one grouped merge launch per group of layers with
the same dtypes, padded rank and layout (``group_plan``); a non-finite std raises a
device flag that makes every later kernel write nothing, and the host reads the flag
once at the end. Otherwise the moments of every layer come first, one sync checks them,
then one ``ema_`` updates every slow pair and one fused merge pass runs per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops, reference
from .group_plan import CascadePlan, eligible
from . import validation as v


@dataclass
class CascadeLayer:
    """One adapted weight: ``W += scale * B_slow @ A_slow`` (transposed for fan_in_fan_out)."""
    W: torch.Tensor
    A_slow: torch.Tensor
    B_slow: torch.Tensor
    A_fast: torch.Tensor
    B_fast: torch.Tensor
    scale: float = 1.0
    seed: int = 0
    row_offset: int = 0
    fan_in_fan_out: bool = False


def _check_layer(i: int, layer: CascadeLayer, rounding, backend) -> str:
    """``cascade_merge_``'s per-layer checks (alpha and noise_lambda are checked once, by the
    caller); the error names the layer. Returns the layer's backend; writes nothing."""
    try:
        backend = ops._check_common(layer.W, rounding, layer.seed, layer.row_offset, backend)
        ops._check_factors(layer.W, layer.A_slow, layer.B_slow, layer.fan_in_fan_out,
                           "A_slow", "B_slow")
        v.check_cascade_pairs(layer.W, layer.A_slow, layer.B_slow, layer.A_fast, layer.B_fast)
        v.check_scalar("scale", layer.scale)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layers[{i}]: {e}") from None
    return backend


def plan_for(layers, *, rounding: str = "nearest", backend=None):
    """A ``CascadePlan`` for these layers if the grouped Triton path applies, else None."""
    layers = list(layers)
    if not layers or v.resolve_backend(backend, layers[0].W.device) != "triton":
        return None
    if not eligible(layers):
        return None
    return CascadePlan(layers, rounding=rounding)


def _std(layer: CascadeLayer, alpha: float, backend: str) -> torch.Tensor:
    """The std of the layer's EMA'd slow product, as ``cascade_merge_`` takes it."""
    return ops._cascade_std(layer.A_slow, layer.B_slow, layer.A_fast, layer.B_fast, alpha,
                            layer.scale, backend)


def _raise_for_std(layers, values) -> None:
    for i, (layer, value) in enumerate(zip(layers, values)):
        try:
            ops._check_std(value, dict(A_slow=layer.A_slow, B_slow=layer.B_slow,
                                       A_fast=layer.A_fast, B_fast=layer.B_fast),
                           "scale * B_slow @ A_slow")
        except ValueError as e:
            raise type(e)(f"layers[{i}]: {e}") from None


@torch.no_grad()
def cascade_merge_many_(layers, *, alpha: float, noise_lambda: float = 0.0,
                        rounding: str = "nearest", backend=None, plan=None) -> torch.Tensor:
    """One cascade boundary for every layer; returns the stds (fp32, one per layer).

    ``plan``: a ``group_plan.CascadePlan`` built earlier for the same tensors (same
    rounding), reused to skip rebuilding its tables; rebuilt if the tensors moved.

    Everything is validated, and every std checked finite, before the first write. Layers
    must not share weights or slow factors with one another. Extra memory: O(r^2) per layer
    on CUDA (the moments' workspaces), the torch path's bounded chunks elsewhere.
    """
    layers = list(layers)
    alpha = v.check_scalar("alpha", alpha, low=0.0, high=1.0)
    noise_lambda = v.check_scalar("noise_lambda", noise_lambda, low=0.0)
    if not layers:
        return torch.empty(0)
    backends = {_check_layer(i, layer, rounding, backend) for i, layer in enumerate(layers)}
    if len(backends) != 1:
        raise ValueError(f"layers resolve to different backends {sorted(backends)}; pass backend=")
    backend = backends.pop()
    spans = sorted(r for layer in layers for t in (layer.W, layer.A_slow, layer.B_slow)
                   if (r := v._byte_range(t)) is not None)
    if any(nxt[0] < cur[1] for cur, nxt in zip(spans, spans[1:])):
        raise ValueError("two layers share a weight or a slow factor")
    if backend == "reference":  # every std checked on EMA'd copies before the first write
        _raise_for_std(layers, [float(_std(layer, alpha, backend)) for layer in layers])
        return torch.stack([reference.cascade_merge_(
            layer.W, layer.A_slow, layer.B_slow, layer.A_fast, layer.B_fast, alpha=alpha,
            scale=layer.scale, noise_lambda=noise_lambda, seed=layer.seed,
            row_offset=layer.row_offset, rounding=rounding, fan_in_fan_out=layer.fan_in_fan_out)
            for layer in layers])
    if backend == "triton" and eligible(layers):
        if plan is None or plan.rounding != rounding or not plan.matches(layers):
            plan = CascadePlan(layers, rounding=rounding)
        plan.launch(alpha, noise_lambda, [layer.seed for layer in layers])
        failed, values = bool(plan.flag.item()), plan.stds.cpu().tolist()  # the one sync
        if failed:
            _raise_for_std(layers, values)
        return plan.stds.clone()
    stds = torch.stack([_std(layer, alpha, backend).to(layers[0].W.device) for layer in layers])
    values = stds.cpu().tolist()  # the one sync of the boundary
    _raise_for_std(layers, values)
    ops._ema([t for layer in layers for t in (layer.A_slow, layer.B_slow)],
             [t for layer in layers for t in (layer.A_fast, layer.B_fast)], alpha, backend)
    for layer, value in zip(layers, values):
        ops._merge(layer.W, layer.A_slow, layer.B_slow, backend, scale=layer.scale,
                   noise=noise_lambda * value, seed=layer.seed, row_offset=layer.row_offset,
                   rounding=rounding, fan_in_fan_out=layer.fan_in_fan_out)
    return stds
