"""Helpers shared by the tests: the test device, inputs, tiny models, fresh-process probes,
and assertions (correct rounding, ulp distance, bit-identical tensors)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch

EPS32 = 2.0 ** -24
# LORASC_TEST_GPU=1: the tests that can run on CUDA do (see conftest.py)
DEVICE = torch.device("cuda" if os.environ.get("LORASC_TEST_GPU") == "1" else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


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


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (same dtype)."""
    assert a.dtype == b.dtype

    def ordered(t):
        bits = t.view(_INT[t.dtype]).long()
        sign_mask = (1 << (8 * t.element_size() - 1)) - 1
        return torch.where(bits < 0, -(bits & sign_mask), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_ulps(got, expected, ulps):
    """Within ``ulps`` representable values, or (cancellation near zero, where the fp32
    arithmetic error exceeds an ulp of the tiny result) within 1e-6 of the largest value."""
    near = ulp_distance(got, expected) <= ulps
    atol = 1e-6 * float(expected.float().abs().max())
    small = (got.double() - expected.double()).abs() <= atol
    bad = ~(near | small)
    assert not bad.any(), (f"{int(bad.sum())} elements off by more than {ulps} ulp(s), e.g. "
                           f"{got[bad][:4].tolist()} vs {expected[bad][:4].tolist()}")


def snapshot(*tensors):
    """Copies of float tensors, to check later with ``unchanged``."""
    return [t.detach().clone() for t in tensors]


def unchanged(before, *tensors) -> bool:
    """Every tensor bit-identical to its snapshot (NaNs, -0.0 and all)."""
    return len(before) == len(tensors) and all(
        b.dtype == t.dtype and torch.equal(b.view(_INT[b.dtype]), t.detach().view(_INT[t.dtype]))
        for b, t in zip(before, tensors))


def clone_layers(layers):
    """Copies of dataclass layers (``batched.CascadeLayer``): every tensor field cloned,
    every other field kept."""
    return [dataclasses.replace(layer, **{f.name: getattr(layer, f.name).clone()
                                          for f in dataclasses.fields(layer)
                                          if isinstance(getattr(layer, f.name), torch.Tensor)})
            for layer in layers]


def tiny_llama(**config):
    """A randomly initialised two-layer Llama (seed torch's generator first); ``config``
    overrides the small defaults."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **config}))


def run_probe(code: str, *args: str, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh Python (one thread; compiled Triton, not the interpreter) and
    return the JSON object on the last line it prints."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])
