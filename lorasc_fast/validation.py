"""Argument checks shared by the public ops; all run before anything is written.

Every check raises with a message naming the argument, so a bad call leaves every
tensor as it was. The finiteness checks read the factors (one device sync per call) and
raise ``NonFiniteError``, a ``ValueError`` that callers can tell from a bad call.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FACTOR_DTYPES = WEIGHT_DTYPES
ROUNDINGS = ("nearest", "stochastic")
BACKENDS = (None, "triton", "torch", "reference")
SEED_LIMIT = 1 << 64


class NonFiniteError(ValueError):
    """An input holds NaN or Inf (``check_finite``); nothing was written."""


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend, device: torch.device) -> str:
    """None -> Triton on CUDA, the torch path elsewhere; "triton" must be runnable there."""
    check_backend(backend)
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        from .triton_path import check_available
        check_available(device)
    return backend


def check_rounding(rounding) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")


def check_weight(W) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in WEIGHT_DTYPES:
        raise TypeError(
            f"W has dtype {W.dtype}; merging needs a float32, float16 or bfloat16 weight "
            "(integer or quantised weights must be dequantised first)")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")


def check_factor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FACTOR_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_pair_shapes(A, B, a_name="A", b_name="B") -> int:
    """A: r x in, B: out x r; returns r."""
    r = A.shape[0]
    if r < 1 or B.shape[1] != r:
        raise ValueError(f"rank mismatch: {a_name} is {tuple(A.shape)} (r x in), "
                         f"{b_name} is {tuple(B.shape)} (out x r)")
    return r


def check_merge_shapes(W, A, B, fan_in_fan_out: bool) -> None:
    out_f, in_f = B.shape[0], A.shape[1]
    expected = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    if tuple(W.shape) != expected:
        layout = "in x out (fan_in_fan_out=True)" if fan_in_fan_out else "out x in"
        raise ValueError(f"shape mismatch: W is {tuple(W.shape)} but B @ A is "
                         f"{out_f} x {in_f}, so W ({layout}) should be {expected}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {listing}")


def _byte_range(t: torch.Tensor):
    if t.numel() == 0:
        return None
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.numel() * t.element_size()
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return lo, lo + (span + 1) * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    ra, rb = _byte_range(a), _byte_range(b)
    return ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]


def check_no_alias(target_name: str, target: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if shares_memory(target, t):
            raise ValueError(f"{target_name} shares memory with {name}; the op writes "
                             f"{target_name} in place, so it must not overlap its inputs")


def check_cascade_pairs(W, A_slow, B_slow, A_fast, B_fast) -> None:
    """The fast factors of one cascade layer (the slow ones checked by ``ops._check_factors``):
    float 2-D tensors shaped like their slow copies, all five tensors on one device, and
    W, A_slow, B_slow (written in place) overlapping none of the others. Reads no values."""
    for name, fast, slow in (("A_fast", A_fast, A_slow), ("B_fast", B_fast, B_slow)):
        check_factor(name, fast)
        if fast.shape != slow.shape:
            raise ValueError(f"{name} is {tuple(fast.shape)} but its slow copy is "
                             f"{tuple(slow.shape)}")
    check_same_device(W=W, A_slow=A_slow, B_slow=B_slow, A_fast=A_fast, B_fast=B_fast)
    check_no_alias("W", W, A_slow=A_slow, B_slow=B_slow, A_fast=A_fast, B_fast=B_fast)
    check_no_alias("A_slow", A_slow, A_fast=A_fast, B_slow=B_slow, B_fast=B_fast)
    check_no_alias("B_slow", B_slow, A_fast=A_fast, B_fast=B_fast)


def check_finite(**tensors) -> None:
    """Which tensors hold NaN or Inf, by reductions that propagate both and need no
    temporaries, and one sync: on CUDA the max-norm of each, one fused multi-tensor launch
    per dtype; on the CPU (where that kernel is slow) each tensor's min and max."""
    named = [(name, t) for name, t in tensors.items() if t.numel()]
    if not named:
        return
    order, finite = [], []
    for dtype in dict.fromkeys(t.dtype for _, t in named):
        idx = [i for i, (_, t) in enumerate(named) if t.dtype == dtype]
        order += idx
        group = [named[i][1] for i in idx]
        if group[0].device.type == "cuda":
            finite.append(torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf")))))
        else:
            extremes = torch.stack([torch.stack(torch.aminmax(t)) for t in group])
            finite.append(torch.isfinite(extremes).all(dim=1))
    flags = dict(zip(order, torch.cat(finite).cpu().tolist()))
    bad = [name for i, (name, _) in enumerate(named) if not flags[i]]
    if bad:
        raise NonFiniteError(f"non-finite values (NaN or Inf) in {', '.join(bad)}")


def check_scalar(name: str, value, *, low=None, high=None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def check_index(name: str, value, limit=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0 or (limit is not None and value >= limit):
        bound = f"[0, 2**{limit.bit_length() - 1})" if limit else ">= 0"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_sequences(slow: Sequence, fast: Sequence) -> None:
    if len(slow) != len(fast):
        raise ValueError(f"ema_ got {len(slow)} slow and {len(fast)} fast tensors")
    for i, (s, f) in enumerate(zip(slow, fast)):
        for name, t in (("slow", s), ("fast", f)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FACTOR_DTYPES:
                raise TypeError(f"{name}[{i}] must be a float32/float16/bfloat16 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        if s.shape != f.shape:
            raise ValueError(f"slow[{i}] is {tuple(s.shape)} but fast[{i}] is {tuple(f.shape)}")
        if s.device != f.device:
            raise ValueError(f"slow[{i}] is on {s.device} but fast[{i}] is on {f.device}")
        if shares_memory(s, f):
            raise ValueError(f"slow[{i}] shares memory with fast[{i}]")
