"""DoRA merge ops: every backend against the fp64 spec, PEFT's formulas, the stream, errors.

On the CPU the Triton backend runs in the interpreter (~12 ms a program), so the shapes
stay small: 300 x 177 is 5 programs of 64 output features.
"""
import pytest
import torch

from helpers import DEVICE, DTYPES, assert_ulps
from lorasc_fast import stream
from lorasc_fast.dora import dora_merge_, dora_unmerge_, dora_weight_norm

FAST = ["torch", "triton"]


def make(gen, out_f=300, in_f=177, r=3, dtype=torch.float32, fifo=False, b_scale=0.1):
    shape = (in_f, out_f) if fifo else (out_f, in_f)
    W = torch.randn(shape, generator=gen).to(dtype)
    A = torch.randn(r, in_f, generator=gen)
    B = torch.randn(out_f, r, generator=gen) * b_scale
    m = torch.rand(out_f, generator=gen) + 0.5
    return [t.to(DEVICE) for t in (W, A, B, m)]


def feature_norms(W, fifo):
    return W.double().norm(dim=0 if fifo else 1)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_merge_matches_reference(gen, backend, dtype, fifo):
    W, A, B, m = make(gen, dtype=dtype, fifo=fifo)
    stochastic = dtype != torch.float32
    kw = dict(scale=0.7, noise=0.25, seed=11, row_offset=3, fan_in_fan_out=fifo,
              rounding="stochastic" if stochastic else "nearest")
    expected = dora_merge_(W.clone(), A, B, m, backend="reference", **kw)
    got = dora_merge_(W.clone(), A, B, m, backend=backend, **kw)
    assert_ulps(got, expected, 4 if dtype == torch.float32 else 1)
    # the spec itself: output-feature norms equal the magnitude (to the rounding of W)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(feature_norms(expected, fifo), m.double(), rtol=tol, atol=0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("fifo", [False, True])
def test_rank_above_16_and_strided_weight(gen, backend, fifo):
    """The tl.dot path (r > 16) and a W that is a transposed view (strides, no copy)."""
    W, A, B, m = make(gen, out_f=70, in_f=45, r=20, fifo=not fifo)
    W = W.T  # stored layout now matches ``fifo``, but non-contiguous
    expected = dora_merge_(W.clone(), A, B, m, scale=0.3, fan_in_fan_out=fifo, backend="reference")
    got = dora_merge_(W, A, B, m, scale=0.3, fan_in_fan_out=fifo, backend=backend)
    assert_ulps(got, expected, 4)


def _peft_dora_layer(fifo):
    from peft.tuners.lora.dora import DoraLinearLayer
    return DoraLinearLayer(fan_in_fan_out=fifo)


@pytest.mark.parametrize("fifo", [False, True])
def test_reference_is_peft_dora_merge(gen, fifo):
    """The spec is PEFT's merge: dora_factor = m / get_weight_norm, W <- factor (W + delta)."""
    from peft.utils.other import transpose
    W, A, B, m = [t.double() for t in make(gen, out_f=40, in_f=23, fifo=fifo)]
    scale = 1.5
    delta = transpose(B @ A, fifo) * scale  # PEFT's get_delta_weight: stored layout
    norm = _peft_dora_layer(fifo).get_weight_norm(W, transpose(delta, fifo), scaling=1)
    factor = transpose((m / norm).view(-1, 1), fifo)
    expected = factor * (W + delta)
    got = dora_merge_(W.float(), A.float(), B.float(), m.float(), scale=scale, fan_in_fan_out=fifo,
                      backend="reference")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    norm_ours = dora_weight_norm(W.float(), A.float(), B.float(), scale=scale, fan_in_fan_out=fifo,
                                 backend="reference")
    torch.testing.assert_close(norm_ours.double(), norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("fifo", [False, True])
def test_weight_norm_and_given_norm(gen, backend, fifo):
    """dora_weight_norm is the norm the fused merge uses: passing it back is bit-identical."""
    W, A, B, m = make(gen, out_f=130, in_f=67, dtype=torch.bfloat16, fifo=fifo)
    kw = dict(scale=0.5, noise=0.1, seed=5, row_offset=7, fan_in_fan_out=fifo)
    norm = dora_weight_norm(W, A, B, backend=backend, **kw)
    ref = dora_weight_norm(W, A, B, backend="reference", **kw)
    assert norm.dtype == torch.float32 and norm.shape == (130,)
    torch.testing.assert_close(norm, ref, rtol=2e-6, atol=0)
    fused = dora_merge_(W.clone(), A, B, m, rounding="stochastic", backend=backend, **kw)
    given = dora_merge_(W.clone(), A, B, m, rounding="stochastic", weight_norm=norm,
                        backend=backend, **kw)
    assert torch.equal(fused.view(torch.int16), given.view(torch.int16))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("fifo", [False, True])
def test_unmerge_inverts_merge(gen, backend, fifo):
    W0, A, B, m = make(gen, out_f=90, in_f=33, fifo=fifo)
    m = m * 3.0  # a dora_factor far from 1
    norm = dora_weight_norm(W0, A, B, scale=2.0, fan_in_fan_out=fifo, backend=backend)
    W = dora_merge_(W0.clone(), A, B, m, scale=2.0, fan_in_fan_out=fifo, weight_norm=norm,
                    backend=backend)
    assert not torch.allclose(W, W0, atol=1e-2)
    expected = dora_unmerge_(W.clone(), A, B, m, norm, scale=2.0, fan_in_fan_out=fifo,
                             backend="reference")
    dora_unmerge_(W, A, B, m, norm, scale=2.0, fan_in_fan_out=fifo, backend=backend)
    assert_ulps(W, expected, 4)
    torch.testing.assert_close(W, W0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fifo", [False, True])
def test_triton_and_torch_draw_the_same_words(gen, fifo):
    """Bit-equality of the two fast paths with noise and stochastic rounding.

    Two input features make every fp32 step exact or a single rounding of identical
    operands (small-integer factors, power-of-two scale, a two-term norm), so any
    difference would be the stream: the noise words, their index in the stored
    layout (row_offset included) or the rounding bits.
    """
    out_f, in_f = 301, 2
    shape = (in_f, out_f) if fifo else (out_f, in_f)
    W = torch.randn(shape, generator=gen).bfloat16().to(DEVICE)
    A = torch.randint(-3, 4, (2, in_f), generator=gen).float().to(DEVICE)
    B = torch.randint(-3, 4, (out_f, 2), generator=gen).bfloat16().to(DEVICE)
    m = (torch.rand(out_f, generator=gen) + 0.5).to(DEVICE)
    kw = dict(scale=0.25, noise=0.75, seed=2**40 + 3, row_offset=9, rounding="stochastic",
              fan_in_fan_out=fifo)
    a = dora_merge_(W.clone(), A, B, m, backend="torch", **kw)
    b = dora_merge_(W.clone(), A, B, m, backend="triton", **kw)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # and the words are the stream's: the same result from the reference within one ulp,
    # while another seed moves most elements
    ref = dora_merge_(W.clone(), A, B, m, backend="reference", **kw)
    assert_ulps(a, ref, 1)
    other = dora_merge_(W.clone(), A, B, m, backend="torch", **{**kw, "seed": 4})
    assert (other != a).float().mean() > 0.5


@pytest.mark.parametrize("backend", FAST)
def test_noise_is_the_stream_at_stored_index(gen, backend):
    """W = 0, no delta: the merged W is m * N / ||N|| with N the stream's noise, read in
    the stored (in x out) layout for fan_in_fan_out."""
    out_f, in_f = 70, 40
    W = torch.zeros(in_f, out_f, device=DEVICE)
    A = torch.randn(1, in_f, generator=gen).to(DEVICE)
    B = torch.zeros(out_f, 1, device=DEVICE)
    m = (torch.rand(out_f, generator=gen) + 0.5).to(DEVICE)
    dora_merge_(W, A, B, m, noise=2.0, seed=99, row_offset=5, fan_in_fan_out=True, backend=backend)
    words = stream.matrix_words(99, in_f, out_f, row_offset=5, device=DEVICE)
    N = stream.noise_from_words(words, 2.0).double()
    expected = N * (m.double() / N.norm(dim=0)).view(1, -1)
    torch.testing.assert_close(W.double(), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees 0/0
@pytest.mark.parametrize("backend", FAST)
def test_zero_norm_feature_is_nan_like_peft(backend):
    W = torch.zeros(4, 8, device=DEVICE)
    W[1:] = 1.0
    A = torch.ones(1, 8, device=DEVICE)
    B = torch.zeros(4, 1, device=DEVICE)
    dora_merge_(W, A, B, torch.ones(4, device=DEVICE), backend=backend)
    assert torch.isnan(W[0]).all() and torch.isfinite(W[1:]).all()


def _error_cases(W, A, B, m):
    nan_m = m.clone()
    nan_m[3] = float("nan")
    nan_A = A.clone()
    nan_A[0, 0] = float("inf")
    zero_norm = torch.ones_like(m)
    zero_norm[5] = 0.0
    return [
        (TypeError, dict(W=W.to(torch.int32))),
        (ValueError, dict(magnitude=m[:-1])),
        (ValueError, dict(magnitude=m.view(-1, 1))),
        (TypeError, dict(magnitude=m.to(torch.int64))),
        (ValueError, dict(magnitude=nan_m)),
        (ValueError, dict(A=nan_A)),
        (ValueError, dict(B=B[:-1])),
        (ValueError, dict(fan_in_fan_out=True)),
        (ValueError, dict(weight_norm=zero_norm)),
        (ValueError, dict(weight_norm=m[:10])),
        (ValueError, dict(magnitude=W.view(-1)[:300])),  # aliases W
        (ValueError, dict(rounding="up")),
        (ValueError, dict(noise=-1.0)),
        (ValueError, dict(scale=float("nan"))),
        (ValueError, dict(backend="cuda")),
        (TypeError, dict(seed=1.5)),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_bad_input_raises_and_leaves_w_unchanged(gen, backend):
    W, A, B, m = make(gen, out_f=300, in_f=20)
    before = W.clone()
    for error, change in _error_cases(W, A, B, m):
        args = dict(W=W, A=A, B=B, magnitude=m, backend=backend)
        args.update(change)
        with pytest.raises(error):
            dora_merge_(args.pop("W"), args.pop("A"), args.pop("B"), args.pop("magnitude"), **args)
        assert torch.equal(W, before), change
    with pytest.raises(ValueError):
        dora_unmerge_(W, A, B, m, torch.zeros_like(m), backend=backend)
    with pytest.raises(ValueError):
        dora_weight_norm(W, A, B[:5], backend=backend)
    assert torch.equal(W, before)
