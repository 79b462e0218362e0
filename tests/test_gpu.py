"""GPU checks: the compiled kernels against the fp64 reference, the stream across GPU,
interpreter and reference, and the ops' extra device memory.

Skipped without CUDA (CI). Run on a GPU machine with
``LORASC_TEST_GPU=1 pytest -q tests/test_gpu.py`` (the variable keeps conftest from
switching Triton to its interpreter).
"""
import os
import textwrap

import pytest
import torch

import lorasc_fast as lf
from lorasc_fast import reference as ref
from lorasc_fast import stream, triton_path
from lorasc_fast.bench import extra_peak_bytes
from helpers import (DTYPES, assert_correctly_rounded, clone_layers, fp32_error_bound, rel_error,
                     run_probe)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA with compiled Triton kernels (LORASC_TEST_GPU=1)")


def _exact(W, A, B, scale, noise, seed, fif):
    v = W.double().cpu() + ref.delta_weight(A.cpu(), B.cpu(), scale, fif)
    if noise:
        v = v + stream.noise_from_words(stream.matrix_words(seed, *W.shape), noise).double()
    return v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("r", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("shape", [(1000, 777), (1024, 4096)])
def test_merge_exact_on_gpu(dtype, fif, r, shape, gen):
    out_f, in_f = shape
    A = torch.randn(r, in_f, generator=gen).cuda()
    B = torch.randn(out_f, r, generator=gen).cuda()
    W = torch.randn((in_f, out_f) if fif else (out_f, in_f), generator=gen).to(dtype).cuda()
    exact = _exact(W, A, B, 0.5, 0.05, 99, fif)
    out = lf.merge_(W.clone(), A, B, scale=0.5, noise=0.05, seed=99, fan_in_fan_out=fif)
    # 3xTF32 drops the low x low partial product: about 2**-21 of each |x y| on top of fp32
    mag = 0.5 * (B.cpu().double().abs() @ A.cpu().double().abs())
    bound = fp32_error_bound(W.cpu(), A.cpu(), B.cpu(), 0.5, 0.05, fif) + 2.0**-19 * (mag.T if fif else mag)
    assert_correctly_rounded(out.cpu(), exact, bound)
    if dtype == torch.float32:
        assert rel_error(out.cpu(), exact) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("cols", [4096, 777])
def test_noise_bit_exact_on_gpu(dtype, rounding, cols, gen):
    W = torch.randn(300, cols, generator=gen).to(dtype)
    expected = ref.add_noise_(W.clone(), 0.3, seed=2**40 + 1, row_offset=7, rounding=rounding)
    got = lf.add_noise_(W.cuda(), 0.3, seed=2**40 + 1, row_offset=7, rounding=rounding)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("seed", [1, 0, 2**63 + 5])
def test_stream_seed_specialisations_on_gpu(seed):
    """Triton passes an integer argument equal to 1 as a compile-time constant (and 0 and
    64-bit seeds differently again): every form gives the reference stream, in the stream
    kernel and in the merge (whose nearest-rounded bf16 noise is pinned by its words)."""
    got = lf.stream_words(40, 136, seed=seed, row_offset=3, device="cuda")
    assert torch.equal(got.cpu(), stream.matrix_words(seed, 40, 136, 3))
    W = torch.zeros(64, 128, device="cuda")
    A, B = torch.zeros(4, 128, device="cuda"), torch.zeros(64, 4, device="cuda")
    lf.merge_(W, A, B, scale=1.0, noise=0.5, seed=seed)
    expected = stream.noise_from_words(stream.matrix_words(seed, 64, 128), 0.5)
    assert torch.equal(W.cpu(), expected)


INTERPRETER_PROBE = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, lorasc_fast as lf
    w = lf.stream_words(96, 777, seed=31337, row_offset=2**20, backend="triton")
    print(json.dumps({"words": w.reshape(-1).tolist()}))
""")


def test_stream_gpu_equals_interpreter_and_reference():
    """The stream kernel compiled for the GPU, interpreted on the CPU, and in torch.

    (The interpreter's merge results are held to the torch reference by the CPU suite; the
    GPU's by test_noise_bit_exact_on_gpu. The probe runs only the loop-free stream kernel:
    Triton 3.6's interpreter cannot run loops with runtime bounds under numpy >= 2.3.)"""
    interp = run_probe(INTERPRETER_PROBE)
    gpu = lf.stream_words(96, 777, seed=31337, row_offset=2**20, device="cuda")
    assert gpu.cpu().reshape(-1).tolist() == interp["words"]
    assert torch.equal(gpu.cpu(), stream.matrix_words(31337, 96, 777, 2**20))


def test_moments_one_launch_is_deterministic_on_gpu(gen):
    """Whichever Gram program arrives last adds the partials in the same order: repeated
    launches, a launch on another stream and CUDA-graph replays give the same bits, and each
    stream's arrival counter is back at zero."""
    A = torch.randn(16, 8192, generator=gen).cuda()
    B = torch.randn(8192, 16, generator=gen).cuda()
    first = triton_path.moments(A, B, 2.0)
    for _ in range(20):
        assert torch.equal(triton_path.moments(A, B, 2.0), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = triton_path.moments(A, B, 2.0)
        counter = triton_path.arrival_counter(A.device)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(other, first) and counter.item() == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = triton_path.moments(A, B, 2.0)
    for _ in range(3):
        graph.replay()
        assert torch.equal(replayed, first)
    assert triton_path.arrival_counter(A.device).item() == 0


@pytest.mark.parametrize("r", [1, 16, 64])
def test_moments_ema_cascade_on_gpu(r, gen):
    A_s, A_f = (torch.randn(r, 4096, generator=gen).cuda() for _ in range(2))
    B_s, B_f = (torch.randn(2048, r, generator=gen).cuda() for _ in range(2))
    M = 2.0 * (B_s.double() @ A_s.double())
    mean, std = lf.lowrank_moments(A_s, B_s, 2.0)
    assert abs(mean.item() - M.mean().item()) <= 1e-5 * M.abs().mean().item()
    assert abs(std.item() - M.std().item()) <= 1e-5 * M.std().item()
    W = torch.randn(2048, 4096, generator=gen).bfloat16().cuda()
    ref_t = [t.cpu().clone() for t in (W, A_s, B_s, A_f, B_f)]
    ref_std = ref.cascade_merge_(*ref_t, alpha=0.6, scale=2.0, noise_lambda=1.0, seed=8)
    got_std = lf.cascade_merge_(W, A_s, B_s, A_f, B_f, alpha=0.6, scale=2.0, noise_lambda=1.0, seed=8)
    assert abs(got_std.item() - ref_std.item()) <= 1e-5 * ref_std.item()
    torch.testing.assert_close(A_s.cpu(), ref_t[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(B_s.cpu(), ref_t[2], rtol=1e-6, atol=1e-6)
    # both are bf16 roundings of values within fp32 error and 1e-5 std of noise width:
    # at most one bf16 ulp apart
    got, want = W.cpu().double(), ref_t[0].double()
    assert ((got - want).abs() <= 2.0 ** -7 * want.abs() + 1e-5 * ref_std.item() + 1e-6).all()


@pytest.mark.parametrize("bad", [None, float("nan"), float("-inf")])
def test_queued_finite_checks_on_gpu(bad, gen):
    """merge_, ema_ and lowrank_moments check on the device, with the write pass queued behind
    the check: a bad factor rejects the call, names it and leaves every tensor as it was."""
    W = torch.randn(1000, 777, generator=gen).bfloat16().cuda()
    A, B = torch.randn(3, 777, generator=gen).cuda(), torch.randn(1000, 3, generator=gen).bfloat16().cuda()
    slow = [torch.randn(5000, 8, generator=gen).cuda() for _ in range(3)]
    fast = [torch.randn(5000, 8, generator=gen).bfloat16().cuda() for _ in range(3)]
    if bad is not None:
        B[999, 2] = bad
        fast[2][4999, 7] = bad
    before = [t.clone() for t in (W, *slow)]
    expected_slow = [0.25 * s + 0.75 * f.float() for s, f in zip(slow, fast)]
    assert triton_path.nonfinite_flag([A, B, *fast]).item() == (bad is not None)
    if bad is None:
        lf.merge_(W, A, B, scale=2.0, noise=0.1, seed=3)
        lf.ema_(slow, fast, 0.25)
        for s_, e in zip(slow, expected_slow):
            torch.testing.assert_close(s_, e, rtol=1e-6, atol=1e-6)
        assert not torch.equal(W, before[0])
        return
    with pytest.raises(ValueError, match="NaN or Inf\\) in B"):
        lf.merge_(W, A, B, scale=2.0, noise=0.1, seed=3)
    with pytest.raises(ValueError, match="NaN or Inf\\) in fast\\[2\\]"):
        lf.ema_(slow, fast, 0.25)
    with pytest.raises(ValueError, match="NaN or Inf\\) in B"):
        lf.lowrank_moments(A, B.float(), 2.0)
    assert all(torch.equal(b, t) for b, t in zip(before, (W, *slow)))


@pytest.mark.parametrize("tiles", [(16, 512, 4), (64, 128, 8), (128, 64, 4)])
def test_tile_invariance_on_gpu(tiles, monkeypatch, gen):
    W = torch.randn(1000, 1024, generator=gen).bfloat16().cuda()
    A, B = torch.randn(8, 1024, generator=gen).cuda(), torch.randn(1000, 8, generator=gen).cuda()
    kw = dict(scale=0.5, noise=0.2, seed=77, rounding="stochastic")
    expected = lf.merge_(W.clone(), A, B, **kw)
    monkeypatch.setattr(triton_path, "merge_config",
                        lambda *a: dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], num_warps=tiles[2]))
    assert torch.equal(lf.merge_(W.clone(), A, B, **kw), expected)


def test_sharding_bit_exact_on_gpu(gen):
    W = torch.randn(1000, 1024, generator=gen).bfloat16().cuda()
    A, B = torch.randn(8, 1024, generator=gen).cuda(), torch.randn(1000, 8, generator=gen).cuda()
    kw = dict(scale=0.5, noise=0.2, seed=77, rounding="stochastic")
    whole = lf.merge_(W.clone(), A, B, **kw)
    shards = [lf.merge_(W[lo:hi].clone(), A, B[lo:hi], row_offset=lo, **kw)
              for lo, hi in ((0, 333), (333, 1000))]
    assert torch.equal(torch.cat(shards), whole)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grouped", [True, False])
def test_cascade_many_on_gpu_equals_per_layer(wdtype, grouped, gen):
    """Ranks <= 16 take the grouped kernels; an r = 64 layer sends the boundary down the
    per-layer path."""
    from lorasc_fast.batched import CascadeLayer, cascade_merge_many_
    specs = [(4096, 1024, 8, False), (1024, 4096, 16, True), (777, 1000, 3, False)]
    if not grouped:
        specs.append((2048, 2048, 64, False))
    layers = []
    for i, (o, n, r, fif) in enumerate(specs):
        W = torch.randn((n, o) if fif else (o, n), generator=gen).to(wdtype).cuda()
        f = [torch.randn(s, generator=gen).cuda() * 0.1 for s in ((r, n), (o, r), (r, n), (o, r))]
        layers.append(CascadeLayer(W, *f, scale=2.0, seed=10 + i, fan_in_fan_out=fif))
    ref = clone_layers(layers)
    stds = cascade_merge_many_(layers, alpha=0.6, noise_lambda=1.0, rounding="stochastic")
    for l, r_, std in zip(layers, ref, stds):
        ref_std = lf.cascade_merge_(r_.W, r_.A_slow, r_.B_slow, r_.A_fast, r_.B_fast, alpha=0.6,
                                    scale=2.0, noise_lambda=1.0, seed=r_.seed, rounding="stochastic",
                                    fan_in_fan_out=r_.fan_in_fan_out)
        assert abs(std.item() - ref_std.item()) <= 1e-6 * ref_std.item()
        assert torch.equal(l.A_slow, r_.A_slow) and torch.equal(l.B_slow, r_.B_slow)
        if std.item() == ref_std.item():
            assert torch.equal(l.W, r_.W)


@pytest.mark.parametrize("r", [16, 64])
def test_extra_device_memory_under_1mib(r):
    W = torch.randn(8192, 8192, device="cuda").bfloat16()
    A_s, A_f = torch.randn(r, 8192, device="cuda"), torch.randn(r, 8192, device="cuda")
    B_s, B_f = torch.randn(8192, r, device="cuda"), torch.randn(8192, r, device="cuda")
    ops = {
        "merge_": lambda: lf.merge_(W, A_s, B_s, noise=0.1, rounding="stochastic"),
        "add_noise_": lambda: lf.add_noise_(W, 0.1),
        "lowrank_moments": lambda: lf.lowrank_moments(A_s, B_s),
        "ema_": lambda: lf.ema_([A_s, B_s], [A_f, B_f], 0.8),
        "cascade_merge_": lambda: lf.cascade_merge_(W, A_s, B_s, A_f, B_f, alpha=0.8, noise_lambda=1.0),
    }
    for name, fn in ops.items():
        fn()  # compile outside the measurement
        assert extra_peak_bytes(fn, cuda=True) <= 1 << 20, name
