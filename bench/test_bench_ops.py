"""pytest-benchmark benchmarks, one per op (not tests: nothing asserts a time).

    pytest bench/test_bench_ops.py --benchmark-only

CPU-sized shapes run the torch path; on a CUDA machine the same benchmarks run the
Triton kernels on 8192 x 8192 bf16 weights. For the full comparison against peers with
bandwidth fractions and memory, run ``lorasc bench``.
"""
import pytest
import torch

import lorasc_fast as lf
from lorasc_fast.batched import CascadeLayer, cascade_merge_many_
from lorasc_fast.bench import qv_adapter_set

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OUT, IN, R = (8192, 8192, 16) if CUDA else (1024, 1024, 16)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def layer():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN, device=DEVICE).bfloat16()
    A = torch.randn(R, IN, device=DEVICE)
    B = torch.randn(OUT, R, device=DEVICE)
    return W, A, B


def _run(benchmark, fn):
    def call():
        fn()
        _sync()
    benchmark.pedantic(call, rounds=20, warmup_rounds=2)


def test_merge(benchmark, layer):
    W, A, B = layer
    _run(benchmark, lambda: lf.merge_(W, A, B, scale=2.0))


def test_merge_noise(benchmark, layer):
    W, A, B = layer
    _run(benchmark, lambda: lf.merge_(W, A, B, scale=2.0, noise=0.1, seed=1))


def test_merge_noise_stochastic(benchmark, layer):
    W, A, B = layer
    _run(benchmark, lambda: lf.merge_(W, A, B, scale=2.0, noise=0.1, seed=1, rounding="stochastic"))


def test_add_noise(benchmark, layer):
    W, _, _ = layer
    _run(benchmark, lambda: lf.add_noise_(W, 0.1, seed=1))


def test_cascade_merge(benchmark, layer):
    W, A, B = layer
    A_s, B_s = A.clone(), B.clone()
    _run(benchmark, lambda: lf.cascade_merge_(W, A_s, B_s, A, B, alpha=1.0, scale=2.0, noise_lambda=1.0))


def test_lowrank_moments(benchmark, layer):
    _, A, B = layer
    _run(benchmark, lambda: lf.lowrank_moments(A, B, 2.0))


def test_ema_adapter_set(benchmark):
    slow, fast = qv_adapter_set(DEVICE)
    _run(benchmark, lambda: lf.ema_(slow, fast, 0.8))


def test_cascade_many(benchmark):
    n, size = (64, 4096) if CUDA else (8, 512)
    layers = [CascadeLayer(torch.randn(size, size, device=DEVICE).bfloat16(),
                           *(torch.randn(s, device=DEVICE) * 0.01 for s in ((8, size), (size, 8)) * 2),
                           scale=2.0, seed=i) for i in range(n)]
    _run(benchmark, lambda: cascade_merge_many_(layers, alpha=1.0, noise_lambda=1.0))
