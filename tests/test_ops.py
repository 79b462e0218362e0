"""Every backend of every op against the fp64 reference, on fresh random inputs.

The Triton backend runs the real kernels under TRITON_INTERPRET=1 here, on CPU tensors;
their compiled GPU counterparts are in test_gpu.py (LORASC_TEST_GPU=1 on a CUDA machine).
"""
import pytest
import torch

import lorasc_fast as lf
from lorasc_fast import reference as ref
from lorasc_fast import stream, triton_path
from helpers import assert_correctly_rounded, fp32_error_bound, rand_factors, rel_error

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANKS = [1, 3, 8, 16, 64]


def _exact_merge(W, A, B, scale, noise, seed, row_offset, fif):
    v = W.double() + ref.delta_weight(A, B, scale, fif)
    if noise:
        w = stream.matrix_words(seed, *W.shape, row_offset)
        v = v + stream.noise_from_words(w, noise).double()
    return v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("r", RANKS)
def test_merge_matches_fp64(backend, dtype, fif, r, gen):
    out_f, in_f = 67, 45 if r != 64 else 132
    A, B = rand_factors(out_f, in_f, r, gen=gen)
    shape = (in_f, out_f) if fif else (out_f, in_f)
    W = torch.randn(shape, generator=gen).to(dtype)
    scale, noise, seed = 0.37, 0.05, int(torch.randint(0, 2**62, (), generator=gen))
    exact = _exact_merge(W, A, B, scale, noise, seed, 3, fif)
    out = W.clone()
    lf.merge_(out, A, B, scale=scale, noise=noise, seed=seed, row_offset=3, fan_in_fan_out=fif,
              backend=backend)
    assert_correctly_rounded(out, exact, fp32_error_bound(W, A, B, scale, noise, fif))
    if dtype == torch.float32:
        assert rel_error(out, exact) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_noise_is_a_no_op(backend, dtype, gen):
    W = torch.randn(33, 70, generator=gen).to(dtype)
    before = W.clone()
    lf.add_noise_(W, 0.0, seed=5, backend=backend)
    assert torch.equal(W, before)


def test_torch_path_ignores_the_default_dtype(gen):
    W = torch.randn(40, 30, generator=gen)
    A, B = rand_factors(40, 30, 3, gen=gen)
    expected = lf.merge_(W.clone(), A, B, scale=0.5, backend="torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = lf.merge_(W.clone(), A, B, scale=0.5, backend="torch")
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_merge_even_walk_unmasked(dtype, rounding, gen, monkeypatch):
    """A W that the tile divides takes the kernel's unmasked walk (EVEN): correctly rounded,
    and bit-equal to the masked walk over the same W."""
    out_f, in_f = 128, 256
    assert triton_path.walk(out_f, in_f, 64, 128, 8)[2]
    A, B = rand_factors(out_f, in_f, 3, gen=gen)
    W = torch.randn(out_f, in_f, generator=gen).to(dtype)
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    kw = dict(scale=0.5, noise=0.05, seed=seed, rounding=rounding, backend="triton")
    even = lf.merge_(W.clone(), A, B, **kw)
    if rounding == "nearest":
        exact = _exact_merge(W, A, B, 0.5, 0.05, seed, 0, False)
        assert_correctly_rounded(even, exact, fp32_error_bound(W, A, B, 0.5, 0.05, False))
    walk = triton_path.walk
    monkeypatch.setattr(triton_path, "walk", lambda *a: (*walk(*a)[:2], False))
    masked = lf.merge_(W.clone(), A, B, **kw)
    assert torch.equal(even.view(torch.uint8), masked.view(torch.uint8))


@pytest.mark.parametrize("M,N,bm,bn,programs", [(8192, 8192, 16, 256, 1056), (11008, 4096, 16, 256, 1056),
                                                (1000, 777, 16, 256, 1056), (1024, 4096, 16, 256, 8),
                                                (4096, 14336, 16, 256, 1056), (48, 256, 16, 256, 1056),
                                                (11008, 4096, 64, 128, 264), (8192, 8192, 64, 128, 264),
                                                (4096, 14336, 64, 128, 264), (8192, 8192, 64, 64, 528)])
def test_walk_covers_every_row_block_once(M, N, bm, bn, programs):
    """Every row block once, in one wave of at most ``programs`` programs (unless the column
    panels alone are more)."""
    row_programs, iters, even = triton_path.walk(M, N, bm, bn, programs)
    row_blocks = -(-M // bm)
    col_blocks = -(-N // bn)
    assert 1 <= row_programs <= row_blocks and row_programs * iters >= row_blocks
    assert row_programs * col_blocks <= max(programs, col_blocks)
    assert row_programs * (iters - 1) < row_blocks  # no program walks only past the end
    if even:
        assert M % bm == 0 and N % bn == 0 and row_programs * iters == row_blocks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_large_odd_shape(backend, dtype, gen):
    A, B = rand_factors(1000, 777, 3, gen=gen)
    W = torch.randn(1000, 777, generator=gen).to(dtype)
    exact = _exact_merge(W, A, B, 2.0, 0.0, 0, 0, False)
    lf.merge_(W_out := W.clone(), A, B, scale=2.0, backend=backend)
    assert_correctly_rounded(W_out, exact, fp32_error_bound(W, A, B, 2.0, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fdtype", [torch.float16, torch.bfloat16])
def test_merge_low_precision_factors(backend, fdtype, gen):
    A, B = rand_factors(70, 90, 8, dtype=fdtype, gen=gen)
    W = torch.randn(70, 90, generator=gen)
    exact = _exact_merge(W, A, B, 1.5, 0.0, 0, 0, False)
    lf.merge_(out := W.clone(), A, B, scale=1.5, backend=backend)
    assert rel_error(out, exact) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_strided_weight_view(backend, gen):
    """W given as a transposed view of a contiguous tensor, and as a column slice."""
    A, B = rand_factors(60, 50, 4, gen=gen)
    base = torch.randn(50, 60, generator=gen)
    W = base.T  # 60 x 50, column-major
    exact = _exact_merge(W, A, B, 0.5, 0.1, 9, 0, False)
    lf.merge_(W, A, B, scale=0.5, noise=0.1, seed=9, backend=backend)
    assert_correctly_rounded(W, exact, fp32_error_bound(exact.float(), A, B, 0.5, 0.1))
    wide = torch.randn(60, 80, generator=gen)
    before = wide.clone()
    lf.merge_(wide[:, 10:60], A, B, scale=0.5, backend=backend)
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 60:], before[:, 60:])
    exact = _exact_merge(before[:, 10:60], A, B, 0.5, 0.0, 0, 0, False)
    assert_correctly_rounded(wide[:, 10:60], exact, fp32_error_bound(before[:, 10:60], A, B, 0.5, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(37, 29), (64, 256)])
def test_add_noise_bit_exact(backend, dtype, rounding, shape, gen):
    """Noise-only updates involve one fp32 addition: every backend is bit-identical."""
    W = torch.randn(shape, generator=gen).to(dtype)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=gen))
    expected = ref.add_noise_(W.clone(), 0.3, seed=seed, row_offset=17, rounding=rounding)
    out = lf.add_noise_(W.clone(), 0.3, seed=seed, row_offset=17, rounding=rounding, backend=backend)
    assert torch.equal(out, expected)
    assert not torch.equal(out, W)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_merge_on_exact_inputs(backend, dtype, gen):
    """With inputs whose fp32 merge is exact, stochastic rounding is bit-identical to the spec."""
    W = (torch.randint(-512, 512, (40, 64), generator=gen).float() / 64).to(dtype)
    A = torch.randint(-4, 5, (2, 64), generator=gen).float() / 8
    B = torch.randint(-4, 5, (40, 2), generator=gen).float() / 1024
    expected = ref.merge_(W.clone(), A, B, scale=0.25, seed=5, rounding="stochastic")
    out = lf.merge_(W.clone(), A, B, scale=0.25, seed=5, rounding="stochastic", backend=backend)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("chunk", [64, 100, 4096])
@pytest.mark.parametrize("r", [3, 16])
def test_moments_independent_of_the_split(chunk, r, monkeypatch, gen):
    """The Grams reduced by many partial programs (chunks of 64 or 100 rows, uneven tails,
    with the EMA on the fly) give the same moments as one program, to fp32 accuracy."""
    A, B, A_f, B_f = (t for pair in (rand_factors(300, 177, r, gen=gen) for _ in range(2)) for t in pair)
    A = A + 0.3
    M = 0.7 * ((0.6 * B + 0.4 * B_f).double() @ (0.6 * A + 0.4 * A_f).double())
    monkeypatch.setitem(triton_path.MOMENT_CHUNK, "cpu", chunk)
    assert triton_path.moment_splits(177, 300, 64, A.device) == (-(-177 // chunk), -(-300 // chunk))
    mean, std = triton_path.moments(A, B, 0.7, ema=(A_f, B_f, 0.6))
    assert abs(mean.item() - M.mean().item()) <= 1e-5 * M.abs().mean().item()
    assert abs(std.item() - M.std().item()) <= 1e-5 * M.std().item()


def test_moments_last_program_resets_the_counter(monkeypatch, gen):
    """The one-launch moments: the program that arrives last adds the partials and leaves the
    stream's arrival counter at zero, so back-to-back calls give the same result."""
    A, B = rand_factors(300, 177, 5, gen=gen)
    monkeypatch.setitem(triton_path.MOMENT_CHUNK, "cpu", 64)
    first = triton_path.moments(A, B, 0.7)
    counter = triton_path.arrival_counter(A.device)
    assert counter.item() == 0
    assert torch.equal(triton_path.moments(A, B, 0.7), first)
    assert counter.item() == 0 and triton_path.arrival_counter(A.device) is counter


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.bfloat16])
def test_lowrank_moments(backend, r, fdtype, gen):
    A, B = rand_factors(300, 177, r, dtype=fdtype, gen=gen)
    A = A + 0.3  # a non-zero mean exercises the sum terms
    M = 0.7 * (B.double() @ A.double())
    mean, std = lf.lowrank_moments(A, B, 0.7, backend=backend)
    assert mean.dtype == std.dtype == torch.float32 and mean.dim() == std.dim() == 0
    assert abs(mean.item() - M.mean().item()) <= 1e-5 * M.abs().mean().item()
    assert abs(std.item() - M.std().item()) <= 1e-5 * M.std().item()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_ema(backend, gen):
    shapes = [(3, 45), (67, 3), (8, 1000), (1, 1)]
    slow = [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(5, 7, generator=gen).bfloat16()]
    fast = [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(5, 7, generator=gen)]
    slow.append(torch.randn(6, 4, generator=gen).T)  # non-contiguous
    fast.append(torch.randn(4, 6, generator=gen))
    exact = [0.6 * s.double() + 0.4 * f.double() for s, f in zip(slow, fast)]
    magnitude = [0.6 * s.double().abs() + 0.4 * f.double().abs() for s, f in zip(slow, fast)]
    lf.ema_(slow, fast, 0.6, backend=backend)
    for s, e, m in zip(slow, exact, magnitude):
        # fp32 math (3 roundings), then one rounding to slow's dtype
        bound = 4 * 2.0**-24 * m + torch.finfo(s.dtype).eps / 2 * e.abs()
        err = (s.double() - e).abs()
        assert bool((err <= bound).all()), f"max error {err.max().item():.3e} for {s.dtype}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_merge(backend, fif, dtype, gen):
    out_f, in_f, r = 90, 70, 5
    A_s, B_s = rand_factors(out_f, in_f, r, gen=gen)
    A_f, B_f = rand_factors(out_f, in_f, r, gen=gen)
    W = torch.randn((in_f, out_f) if fif else (out_f, in_f), generator=gen).to(dtype)
    kw = dict(alpha=0.8, scale=2.0, noise_lambda=1.0, seed=11, row_offset=0, fan_in_fan_out=fif)
    ref_t = [t.clone() for t in (W, A_s, B_s, A_f, B_f)]
    ref_std = ref.cascade_merge_(*ref_t, **kw)
    got = [t.clone() for t in (W, A_s, B_s, A_f, B_f)]
    std = lf.cascade_merge_(*got, backend=backend, **kw)
    assert abs(std.item() - ref_std.item()) <= 1e-5 * ref_std.item()
    for new, old in ((got[1], ref_t[1]), (got[2], ref_t[2])):
        assert torch.allclose(new, old, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[3], A_f) and torch.equal(got[4], B_f)
    # the merge used the updated slow factors and a noise width of lambda * std
    exact = _exact_merge(W, ref_t[1], ref_t[2], 2.0, float(std), 11, 0, fif)
    assert_correctly_rounded(got[0], exact, fp32_error_bound(W, ref_t[1], ref_t[2], 2.0, float(std), fif)
                             + 1e-5 * float(std))


def test_zero_sized_and_no_autograd():
    W = torch.randn(4, 6, requires_grad=True)
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    lf.merge_(W, A, B, noise=0.1)  # in place on a leaf that requires grad: raises unless no_grad
    assert W.grad_fn is None
    V = W * 1.0  # a non-leaf: an op recorded by autograd would replace its grad_fn
    lf.merge_(V, A, B, noise=0.1)
    assert type(V.grad_fn).__name__ == "MulBackward0"
    empty = torch.empty(0, 6)
    assert lf.merge_(empty, A, torch.randn(0, 2), backend="triton") is empty
