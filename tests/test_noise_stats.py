"""Statistics of the noise and of stochastic rounding (the random ops' behaviour, not just bits)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import lorasc_fast as lf

N_ROWS, N_COLS = 512, 1024  # 2**19 draws


@pytest.fixture(scope="module")
def noise():
    """U - 1/2 for one seed, drawn through the op itself (fp32 W = 0 makes it exact)."""
    W = torch.zeros(N_ROWS, N_COLS)
    return lf.add_noise_(W, 1.0, seed=123, backend="torch").double()


def test_range_and_moments(noise):
    assert noise.min() > -0.5 and noise.max() < 0.5
    assert noise.min() < -0.4999 and noise.max() > 0.4999
    n = noise.numel()
    # mean 0 with sd sqrt(1/12 / n); variance 1/12 with sd sqrt(1/180 / n)
    assert abs(noise.mean().item()) < 5 * math.sqrt(1 / 12 / n)
    assert abs(noise.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # the distribution is symmetric: odd central moment vanishes
    assert abs((noise ** 3).mean().item()) < 5 * math.sqrt(1 / 448 / n)


def test_kolmogorov_smirnov(noise):
    sample = noise.reshape(-1)[::7].numpy() + 0.5
    assert stats.kstest(sample, "uniform").pvalue > 0.01


def test_resolution_is_16_bits(noise):
    """Values sit on the grid (k + 1/2) / 2**16 - 1/2 and use (nearly) all of its 65536 points."""
    k = noise * 65536 + 32767.5
    assert torch.equal(k, k.round())
    # 2**19 draws miss each point with probability e**-8: about 22 of 65536 expected missing
    assert torch.unique(k).numel() > 65536 - 100


def _corr(a, b):
    a, b = a.reshape(-1).numpy(), b.reshape(-1).numpy()
    return float(np.corrcoef(a, b)[0, 1])


def test_no_correlation_between_rows_columns_tiles(noise):
    n = noise.numel()
    limit = 5 / math.sqrt(n / 2)
    assert abs(_corr(noise[:-1], noise[1:])) < limit           # adjacent rows
    assert abs(_corr(noise[:, :-1], noise[:, 1:])) < limit     # adjacent columns (same Philox call)
    assert abs(_corr(noise[:, :-4], noise[:, 4:])) < limit     # neighbouring Philox groups
    assert abs(_corr(noise[:, :-128], noise[:, 128:])) < limit  # across tiles, along a row
    assert abs(_corr(noise[:-64], noise[64:])) < limit         # across tiles, down a column
    lanes = noise.reshape(-1, 4)                                # the four words of one call
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_corr(lanes[:, i], lanes[:, j])) < 5 / math.sqrt(lanes.shape[0])


def test_seeds_and_offsets_are_independent(noise):
    other = lf.add_noise_(torch.zeros(N_ROWS, N_COLS), 1.0, seed=124, backend="torch").double()
    assert abs(_corr(noise, other)) < 5 / math.sqrt(noise.numel())
    shifted = lf.add_noise_(torch.zeros(N_ROWS, N_COLS), 1.0, seed=123, row_offset=1,
                            backend="torch").double()
    assert torch.equal(shifted[:-1], noise[1:])  # same stream, one row on


def test_noise_and_rounding_fields_are_independent():
    w = lf.stream_words(256, 1024, seed=7)
    hi, lo = (w >> 16).double(), (w & 0xFFFF).double()
    assert abs(_corr(hi, lo)) < 5 / math.sqrt(w.numel())
    assert stats.kstest(lo.reshape(-1)[::5].numpy() / 65536, "uniform").pvalue > 0.01


def test_noise_scales_linearly():
    a = lf.add_noise_(torch.zeros(64, 64), 1.0, seed=3)
    b = lf.add_noise_(torch.zeros(64, 64), 8.0, seed=3)
    assert torch.equal(b, a * 8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_stochastic_rounding_is_unbiased(backend, dtype, ulp):
    """A sub-ulp delta survives on average with stochastic rounding and is lost with nearest."""
    gen = torch.Generator().manual_seed(0)
    W = (1 + 0.9 * torch.rand(64, 128, generator=gen)).to(dtype)  # in [1, 1.9]: one ulp size
    delta = 0.3 * ulp
    A = torch.ones(1, 128)
    B = torch.full((64, 1), delta)
    merges = 8 if backend == "triton" else 24
    total = torch.zeros(64, 128, dtype=torch.float64)
    for seed in range(merges):
        out = lf.merge_(W.clone(), A, B, seed=seed, rounding="stochastic", backend=backend)
        total += out.double() - W.double()
    n = W.numel() * merges
    mean = total.sum().item() / n
    # each element moves up by one ulp with probability 0.3: a 5-sigma interval
    assert abs(mean - delta) < 5 * ulp * math.sqrt(0.3 * 0.7 / n)
    nearest = lf.merge_(W.clone(), A, B, backend=backend)
    assert torch.equal(nearest, W)
