"""cascade_merge_many_: the same result as per-layer cascade_merge_, validated up front."""
import pytest
import torch

import lorasc_fast as lf
from lorasc_fast import group_plan
from lorasc_fast.kernels import cascade_group as cg
from lorasc_fast.batched import CascadeLayer, cascade_merge_many_, plan_for
from lorasc_fast.validation import NonFiniteError
from helpers import clone_layers, snapshot, unchanged


def _layers(gen, dtype=torch.bfloat16, fdtype=torch.float32, extra=()):
    specs = [(64, 48, 4, False), (40, 96, 8, True), (33, 20, 3, False), *extra]
    layers = []
    for i, (out_f, in_f, r, fif) in enumerate(specs):
        W = torch.randn((in_f, out_f) if fif else (out_f, in_f), generator=gen).to(dtype)
        t = [torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen),
             torch.randn(r, in_f, generator=gen).to(fdtype), torch.randn(out_f, r, generator=gen).to(fdtype)]
        layers.append(CascadeLayer(W, *t, scale=2.0 / (i + 1), seed=100 + i, fan_in_fan_out=fif))
    return layers


@pytest.mark.parametrize("backend,dtype,fdtype", [
    ("triton", torch.bfloat16, torch.float32), ("triton", torch.float16, torch.bfloat16),
    ("triton", torch.float32, torch.float16), ("torch", torch.bfloat16, torch.float32)])
def test_many_equals_per_layer(backend, dtype, fdtype, gen):
    """Several groups (storage kinds, layouts) in one grouped boundary."""
    layers = _layers(gen, dtype, fdtype, extra=[(50, 36, 12, False), (24, 40, 16, True)])
    expected = clone_layers(layers)
    stds = cascade_merge_many_(layers, alpha=0.7, noise_lambda=1.0, rounding="stochastic",
                               backend=backend)
    for layer, ref, std in zip(layers, expected, stds):
        ref_std = lf.cascade_merge_(ref.W, ref.A_slow, ref.B_slow, ref.A_fast, ref.B_fast, alpha=0.7,
                                    scale=ref.scale, noise_lambda=1.0, seed=ref.seed,
                                    rounding="stochastic", fan_in_fan_out=ref.fan_in_fan_out,
                                    backend=backend)
        assert torch.equal(std, ref_std)
        for got, want in ((layer.W, ref.W), (layer.A_slow, ref.A_slow), (layer.B_slow, ref.B_slow)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_many_rejects_before_writing(backend, gen):
    """A bad last layer is found before any layer is written, on every backend."""
    layers = _layers(gen)
    written = [t for layer in layers for t in (layer.W, layer.A_slow, layer.B_slow)]
    before = snapshot(*written)
    layers[2].B_fast[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers\[2\].*NaN or Inf"):
        cascade_merge_many_(layers, alpha=0.5, noise_lambda=1.0, backend=backend)
    assert unchanged(before, *written)
    layers[2].B_fast[0, 0] = 0.0
    bad_shape = CascadeLayer(torch.randn(3, 3), layers[0].A_slow, layers[0].B_slow,
                             layers[0].A_fast, layers[0].B_fast)
    with pytest.raises(ValueError, match=r"layers\[3\]: shape mismatch"):
        cascade_merge_many_(layers + [bad_shape], alpha=0.5)
    assert unchanged(before, *written)
    twin = CascadeLayer(layers[0].W, *(t.clone() for t in (layers[0].A_slow, layers[0].B_slow,
                                                           layers[0].A_fast, layers[0].B_fast)))
    with pytest.raises(ValueError, match="share a weight"):
        cascade_merge_many_(layers + [twin], alpha=0.5)
    assert unchanged(before, *written)


def test_plan_reuse_across_boundaries(gen):
    """A plan built once serves later boundaries (new seeds, new alpha) like fresh calls."""
    from lorasc_fast.group_plan import CascadePlan
    layers = _layers(gen, extra=[(50, 36, 12, False)])
    fresh = clone_layers(layers)
    plan = CascadePlan(layers, rounding="stochastic")
    for boundary, alpha in enumerate((0.8, 0.5)):
        for group in (layers, fresh):
            for i, layer in enumerate(group):
                layer.seed = 1000 * boundary + i
        a = cascade_merge_many_(layers, alpha=alpha, noise_lambda=1.0, rounding="stochastic",
                                backend="triton", plan=plan)
        b = cascade_merge_many_(fresh, alpha=alpha, noise_lambda=1.0, rounding="stochastic",
                                backend="triton")
        assert torch.equal(a, b)
        assert all(torch.equal(x.W, y.W) and torch.equal(x.A_slow, y.A_slow)
                   for x, y in zip(layers, fresh))


def test_plan_follows_a_changed_scale_or_offset(gen):
    """A plan holds each layer's scale and row offset: changing either makes it stale, and
    a call handed the stale plan builds a fresh one."""
    from lorasc_fast.group_plan import CascadePlan
    layers = _layers(gen)
    plan = CascadePlan(layers)
    assert plan.matches(layers)
    layers[1].scale *= 3.0
    assert not plan.matches(layers)
    layers[1].scale /= 3.0
    layers[2].row_offset = 7
    assert not plan.matches(layers)
    layers[0].scale = 5.0
    fresh = clone_layers(layers)  # with layers[2].row_offset = 7
    a = cascade_merge_many_(layers, alpha=0.5, noise_lambda=1.0, backend="triton", plan=plan)
    b = cascade_merge_many_(fresh, alpha=0.5, noise_lambda=1.0, backend="triton")
    assert torch.equal(a, b) and all(torch.equal(x.W, y.W) for x, y in zip(layers, fresh))


def test_large_rank_takes_the_per_layer_path(gen):
    from lorasc_fast.group_plan import eligible
    layers = _layers(gen, extra=[(50, 36, 20, False)])
    assert not eligible(layers) and eligible(layers[:3])
    expected = clone_layers(layers)
    cascade_merge_many_(layers, alpha=0.5, noise_lambda=1.0, backend="triton")
    for ref in expected:
        lf.cascade_merge_(ref.W, ref.A_slow, ref.B_slow, ref.A_fast, ref.B_fast, alpha=0.5,
                          scale=ref.scale, noise_lambda=1.0, seed=ref.seed,
                          fan_in_fan_out=ref.fan_in_fan_out, backend="triton")
    assert all(torch.equal(a.W, b.W) for a, b in zip(layers, expected))


def test_gram_chunk_is_the_shortest_that_fits_the_budget():
    lengths = [4096, 1024, 1024, 4096, 14336, 14336, 4096] * 4
    for budget, shortest in ((200, 256), (60, 256), (10, 256), (1000, 256), (200, 1000)):
        chunk = group_plan._gram_chunk(lengths, budget, shortest)
        parts = sum(-(-n // chunk) for n in lengths)
        assert chunk >= shortest
        if budget >= len(lengths):  # one partial per factor always fits
            assert parts <= budget, (budget, chunk, parts)
        else:
            assert chunk == max(lengths)
        if chunk > shortest:  # one row less would need more partials than the budget
            assert sum(-(-n // (chunk - 1)) for n in lengths) > budget or chunk == max(lengths)


def test_grouped_moments_spend_the_workspace_on_the_longest_walks(monkeypatch, gen):
    """A grouped moments launch lasts as long as its longest walk: the plan takes the
    shortest chunk whose partials fit the workspace, so long factors get several partials
    and the workspace stays within its budget; the stds stay those of the per-layer
    moments up to fp32 rounding of the partial sums."""
    monkeypatch.setitem(lf.triton_path.MOMENT_CHUNK, "cpu", 16)
    monkeypatch.setattr(group_plan, "_WS_FLOATS", 12 * 4 * 272)  # 12 slots per layer, r_pad 16
    layers = _layers(gen, extra=[(200, 40, 4, False)])
    plan = plan_for(layers, rounding="nearest", backend="triton")
    fields = {name: i for i, name in enumerate(cg.GRAM_FIELDS)}
    walks, lengths, parts = [], [], 0
    for launch in plan.moment_launches:
        table = launch["table"].view(-1, len(cg.GRAM_FIELDS))
        for row in table.tolist():
            parts += row[fields["split_a"]] + row[fields["split_b"]]
            for n, chunk in (("IN", "chunk_a"), ("OUT", "chunk_b")):
                walks.append(row[fields[chunk]])
                lengths.append(row[fields[n]])
    assert parts * 272 <= group_plan._WS_FLOATS and plan.ws.numel() <= group_plan._WS_FLOATS
    assert max(walks) < max(lengths)  # the 200-row factor is split
    assert parts > len(lengths)  # the budget is spent on more than one partial per factor
    expected = [lf.lowrank_moments(layer.A_slow.clone().mul_(0.7).add_(layer.A_fast, alpha=0.3),
                                   layer.B_slow.clone().mul_(0.7).add_(layer.B_fast, alpha=0.3),
                                   layer.scale, backend="triton")[1] for layer in layers]
    stds = cascade_merge_many_(layers, alpha=0.7, noise_lambda=1.0, backend="triton", plan=plan)
    torch.testing.assert_close(stds, torch.stack(expected), rtol=1e-5, atol=0)
