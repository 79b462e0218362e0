"""Assertions shared by the op tests."""
from __future__ import annotations

import torch

EPS32 = 2.0 ** -24


def rand_factors(out_f, in_f, r, dtype=torch.float32, gen=None, device="cpu"):
    A = torch.randn(r, in_f, generator=gen).to(device=device, dtype=dtype)
    B = torch.randn(out_f, r, generator=gen).to(device=device, dtype=dtype)
    return A, B


def fp32_error_bound(W, A, B, scale, noise, fan_in_fan_out=False):
    """Elementwise bound on the fp32 arithmetic error of ``W + s B A + noise (U - 1/2)``."""
    r = A.shape[0]
    mag = abs(scale) * (B.double().abs() @ A.double().abs())
    if fan_in_fan_out:
        mag = mag.T
    total = W.double().abs().to(mag.device) + mag + noise / 2
    return (r + 4) * EPS32 * total  # gamma_{r+4}: r FMAs, scale, W, noise (Higham 3.1)


def assert_correctly_rounded(out, exact64, bound, *, max_off=0.005):
    """``out`` is the round-to-nearest-even of some value within ``bound`` of ``exact64``.

    Where the fp32 error interval holds no rounding boundary this pins ``out`` to the one
    correctly rounded value. For fp16/bf16 outputs it also checks that at most ``max_off``
    of the elements differ from the correct rounding of the exact value (only elements
    whose exact value lies next to a rounding midpoint may).
    """
    dtype = out.dtype
    exact64 = exact64.to(out.device)
    bound = bound.to(out.device)
    lo = (exact64 - bound).float().to(dtype).double()
    hi = (exact64 + bound).float().to(dtype).double()
    o = out.double()
    ok = (o >= lo) & (o <= hi)
    assert ok.all(), (
        f"{(~ok).sum().item()} of {ok.numel()} elements not correctly rounded; "
        f"worst |out - exact| = {(o - exact64).abs().max().item():.3e}")
    if dtype == torch.float32:
        return  # the bound spans a few fp32 ulps; callers also check the relative error
    off = (out != exact64.float().to(dtype)).double().mean().item()
    assert off <= max_off, f"{off:.3%} elements differ from the correctly rounded value"


def rel_error(out, exact64):
    exact64 = exact64.to(out.device)
    return ((out.double() - exact64).norm() / exact64.norm()).item()
