"""The spec: every op as plain, materialising torch math.

These functions allocate freely (the full ``out x in`` delta, the full noise tensor,
fp64 copies) and are slow; they exist so that every fast backend can be held to
them in tests. Same names and keywords as the public ops in ``lorasc_fast.ops``,
no validation beyond what the math needs.

Arithmetic contract shared with the kernels:

* the merged value is formed in fp64 here (fp32 in the kernels), rounded once to
  fp32, then to ``W.dtype`` by round-to-nearest-even or by stochastic rounding;
* noise is ``noise * (U - 0.5)`` computed in fp32 exactly as ``stream.noise_from_words``;
* stochastic rounding draws the low 16 bits of the element's word (``stream``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import stream

__all__ = [
    "lowrank_moments", "merge_", "add_noise_", "ema_", "cascade_merge_",
    "round_fp32", "delta_weight",
]


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0,
                 fan_in_fan_out: bool = False) -> torch.Tensor:
    """``scale * B @ A`` in fp64, transposed for ``fan_in_fan_out`` (W stored in x out)."""
    delta = scale * (B.double() @ A.double())
    return delta.T if fan_in_fan_out else delta


def lowrank_moments(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0):
    """Mean and unbiased std of ``scale * B @ A``, from the materialised fp64 product."""
    M = delta_weight(A, B, scale)
    return M.mean().float(), M.std().float()


def _stochastic_bf16(v: torch.Tensor, frac16: torch.Tensor) -> torch.Tensor:
    # Adding a uniform 16-bit draw below the kept bits and truncating rounds the
    # magnitude up with probability (dropped bits) / 2**16: exactly unbiased.
    bits = v.view(torch.int32).to(torch.int64) & stream.MASK32
    out = ((bits + frac16) >> 16) & 0xFFFF
    out = torch.where(torch.isnan(v), torch.full_like(out, 0x7FC0), out)
    return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)


def _stochastic_fp16(v: torch.Tensor, frac16: torch.Tensor) -> torch.Tensor:
    # ulp of fp16 at |v| (normals: 2**(e - 10); subnormals: 2**-24); v / ulp is exact
    # in fp32, and its fractional part has at most 13 bits for normals, so comparing
    # a 16-bit uniform against it rounds up with probability exactly frac.
    _, e = torch.frexp(v)
    ulp = torch.ldexp(torch.ones_like(v), torch.clamp(e - 1, min=-14) - 10)
    q = v / ulp
    down = torch.floor(q)
    up = (frac16.to(torch.float32) * stream.INV_2_16) < (q - down)
    out = (down + up.to(torch.float32)) * ulp
    return torch.where(torch.isfinite(v), out, v).to(torch.float16)


def round_fp32(v: torch.Tensor, dtype: torch.dtype, rounding: str = "nearest",
               frac16: torch.Tensor | None = None) -> torch.Tensor:
    """Round fp32 ``v`` to ``dtype``: nearest-even, or stochastically with draws ``frac16``."""
    if dtype == torch.float32 or rounding == "nearest":
        return v.to(dtype)
    if dtype == torch.bfloat16:
        return _stochastic_bf16(v, frac16)
    if dtype == torch.float16:
        return _stochastic_fp16(v, frac16)
    raise TypeError(f"cannot round to {dtype}")


def _finish(W: torch.Tensor, v64: torch.Tensor, noise: float, seed: int, row_offset: int,
            rounding: str) -> torch.Tensor:
    rows, cols = W.shape
    w = stream.matrix_words(seed, rows, cols, row_offset, device=W.device)
    if noise != 0.0:
        v64 = v64 + stream.noise_from_words(w, noise).double()
    v32 = v64.float()
    W.copy_(round_fp32(v32, W.dtype, rounding, stream.rounding_fraction(w)))
    return W


@torch.no_grad()
def merge_(W, A, B, *, scale=1.0, noise=0.0, seed=0, row_offset=0, rounding="nearest",
           fan_in_fan_out=False):
    """``W += scale * B @ A + noise * (U - 0.5)``, materialised in fp64."""
    v = W.double() + delta_weight(A, B, scale, fan_in_fan_out)
    return _finish(W, v, noise, seed, row_offset, rounding)


@torch.no_grad()
def add_noise_(W, noise, *, seed=0, row_offset=0, rounding="nearest"):
    """``W += noise * (U - 0.5)``."""
    return _finish(W, W.double(), noise, seed, row_offset, rounding)


@torch.no_grad()
def ema_(slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float):
    """``slow = alpha * slow + (1 - alpha) * fast`` for each pair, in fp64."""
    for s, f in zip(slow, fast):
        s.copy_((alpha * s.double() + (1.0 - alpha) * f.double()).to(s.dtype))


@torch.no_grad()
def cascade_merge_(W, A_slow, B_slow, A_fast, B_fast, *, alpha, scale=1.0, noise_lambda=0.0,
                   seed=0, row_offset=0, rounding="nearest", fan_in_fan_out=False):
    """One cascade boundary: EMA the factors, merge the slow expert, add persistent noise.

    Returns ``std(scale * B_slow @ A_slow)`` of the updated slow factors (fp32, 0-d).
    """
    ema_([A_slow, B_slow], [A_fast, B_fast], alpha)
    _, std = lowrank_moments(A_slow, B_slow, scale)
    merge_(W, A_slow, B_slow, scale=scale, noise=noise_lambda * float(std), seed=seed,
           row_offset=row_offset, rounding=rounding, fan_in_fan_out=fan_in_fan_out)
    return std
