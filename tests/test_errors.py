"""Bad input: a clear error, and every tensor bit-identical afterwards."""
import pytest
import torch

import lorasc_fast as lf
from lorasc_fast.validation import NonFiniteError
from helpers import snapshot, unchanged

BACKENDS = ["triton", "torch", "reference"]


@pytest.fixture
def layer(gen):
    W = torch.randn(20, 12, generator=gen)
    A = torch.randn(3, 12, generator=gen)
    B = torch.randn(20, 3, generator=gen)
    return W, A, B


CASES = [
    ("shape", lambda W, A, B: dict(A=torch.randn(3, 13)), ValueError, "shape mismatch"),
    ("rank", lambda W, A, B: dict(B=torch.randn(20, 4)), ValueError, "rank mismatch"),
    ("fif shape", lambda W, A, B: dict(fan_in_fan_out=True), ValueError, "fan_in_fan_out"),
    ("device", lambda W, A, B: dict(A=torch.empty(3, 12, device="meta")), ValueError, "one device"),
    ("nan A", lambda W, A, B: dict(A=A.clone().index_fill_(1, torch.tensor([5]), float("nan"))),
     NonFiniteError, "NaN or Inf"),
    ("inf B", lambda W, A, B: dict(B=B.clone().index_fill_(0, torch.tensor([2]), float("inf"))),
     NonFiniteError, "NaN or Inf"),
    ("-inf A", lambda W, A, B: dict(A=A.clone().index_fill_(1, torch.tensor([0]), float("-inf"))),
     NonFiniteError, "NaN or Inf"),
    ("alias", lambda W, A, B: dict(A=W[:3]), ValueError, "shares memory"),
    ("rounding", lambda W, A, B: dict(rounding="up"), ValueError, "unknown rounding"),
    ("backend", lambda W, A, B: dict(backend="cuda"), ValueError, "unknown backend"),
    ("negative noise", lambda W, A, B: dict(noise=-0.1), ValueError, "noise must be >= 0"),
    ("nan noise", lambda W, A, B: dict(noise=float("nan")), ValueError, "noise must be finite"),
    ("seed", lambda W, A, B: dict(seed=-1), ValueError, "seed must be in"),
    ("seed type", lambda W, A, B: dict(seed=1.5), TypeError, "seed must be an int"),
    ("row_offset", lambda W, A, B: dict(row_offset=-3), ValueError, "row_offset"),
    ("factor dtype", lambda W, A, B: dict(A=A.double()), TypeError, "A has dtype torch.float64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,change,exc,message", CASES, ids=[c[0] for c in CASES])
def test_merge_rejects(backend, name, change, exc, message, layer):
    W, A, B = layer
    kw = dict(A=A, B=B, backend=backend)
    kw.update(change(W, A, B))
    before = snapshot(W, A, B)
    with pytest.raises(exc, match=message):
        lf.merge_(W, kw.pop("A"), kw.pop("B"), noise=kw.pop("noise", 0.5), **kw)
    assert unchanged(before, W, A, B)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float64])
def test_non_float_weight_is_a_type_error(dtype, layer):
    _, A, B = layer
    W = torch.randint(-5, 5, (20, 12)).to(dtype)
    before = W.clone()
    with pytest.raises(TypeError, match=str(dtype)):
        lf.merge_(W, A, B)
    with pytest.raises(TypeError, match=str(dtype)):
        lf.add_noise_(W, 1.0)
    assert torch.equal(W, before)


def test_quantised_weight_is_a_type_error(layer):
    _, A, B = layer
    W = torch.quantize_per_tensor(torch.randn(20, 12), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match="torch.qint8"):
        lf.merge_(W, A, B)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cascade_rejects_before_writing(backend, gen):
    W = torch.randn(20, 12, generator=gen)
    A_s, A_f = torch.randn(3, 12, generator=gen), torch.randn(3, 12, generator=gen)
    B_s, B_f = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen)
    tensors = (W, A_s, B_s, A_f, B_f)
    before = snapshot(*tensors)
    bad_calls = [
        (dict(alpha=1.5), ValueError, "alpha must be <= 1"),
        (dict(alpha=-0.1), ValueError, "alpha must be >= 0"),
        (dict(alpha=0.5, noise_lambda=-1.0), ValueError, "noise_lambda must be >= 0"),
        (dict(alpha=0.5, A_fast=torch.randn(3, 11)), ValueError, "A_fast is"),
        (dict(alpha=0.5, A_fast=A_s), ValueError, "shares memory"),
        (dict(alpha=0.5, B_fast=B_f.clone().fill_(float("nan"))), NonFiniteError, "NaN or Inf"),
        (dict(alpha=1.0, A_fast=A_f.clone().fill_(float("inf"))), NonFiniteError, "NaN or Inf"),
        # factors whose product overflows fp32: the std is not finite
        (dict(alpha=0.5, A_fast=torch.randn(3, 12, generator=gen) * 1e20,
              B_fast=torch.randn(20, 3, generator=gen) * 1e20), ValueError, "std"),
    ]
    for change, exc, message in bad_calls:
        kw = dict(A_fast=A_f, B_fast=B_f, backend=backend, noise_lambda=1.0)
        kw.update(change)
        with pytest.raises(exc, match=message):
            lf.cascade_merge_(W, A_s, B_s, kw.pop("A_fast"), kw.pop("B_fast"), **kw)
        assert unchanged(before, *tensors)


def test_ema_rejects(gen):
    s = [torch.randn(3, 4, generator=gen)]
    before = snapshot(*s)
    with pytest.raises(ValueError, match="1 slow and 2 fast"):
        lf.ema_(s, [torch.randn(3, 4), torch.randn(3, 4)], 0.5)
    with pytest.raises(ValueError, match="slow\\[0\\] is \\(3, 4\\) but fast\\[0\\] is \\(4, 3\\)"):
        lf.ema_(s, [torch.randn(4, 3)], 0.5)
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        lf.ema_(s, [torch.randn(3, 4)], 2.0)
    with pytest.raises(ValueError, match="NaN or Inf\\) in fast\\[0\\]"):
        lf.ema_(s, [torch.full((3, 4), float("inf"))], 0.5)
    with pytest.raises(ValueError, match="NaN or Inf\\) in fast\\[0\\]"):  # -inf alone
        lf.ema_(s, [torch.ones(3, 4).index_fill_(1, torch.tensor([2]), float("-inf"))], 0.5)
    assert unchanged(before, *s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [1, 3])
def test_ema_rejects_non_finite_without_writing(backend, bad, gen):
    """A NaN in one fast tensor (pair 1: dense, on the Triton path checked on the device;
    pair 3: strided) rejects the whole call, naming it; no slow tensor changes."""
    slow = [torch.randn(5, 7, generator=gen) for _ in range(3)] + [torch.randn(7, 5, generator=gen).T]
    fast = [torch.randn(5, 7, generator=gen) for _ in range(4)]
    fast[bad][2, 3] = float("nan")
    before = snapshot(*slow)
    with pytest.raises(ValueError, match=f"NaN or Inf\\) in fast\\[{bad}\\]"):
        lf.ema_(slow, fast, 0.5, backend=backend)
    assert unchanged(before, *slow)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_reject_non_finite(backend, gen):
    A, B = torch.randn(3, 50, generator=gen), torch.randn(40, 3, generator=gen)
    B[7, 1] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf\\) in B"):
        lf.lowrank_moments(A, B, 2.0, backend=backend)


def test_moments_reject_bad_factors():
    with pytest.raises(ValueError, match="rank mismatch"):
        lf.lowrank_moments(torch.randn(3, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lf.lowrank_moments(torch.full((3, 5), float("nan")), torch.randn(4, 3))
