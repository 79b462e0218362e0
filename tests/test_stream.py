"""The random stream: Philox known answers, Triton equality, and what the index may depend on."""
import pytest
import torch
import triton
import triton.language as tl

import lorasc_fast as lf
from lorasc_fast import stream, triton_path


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize("key,ctr,expected", [
    # Random123's known-answer vectors for Philox4x32-10
    (0, (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (0xFFFFFFFFFFFFFFFF, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (0x299F31D0A4093822, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(key, ctr, expected):
    got = stream.philox4x32(key, *(_t(c) for c in ctr))
    assert tuple(int(g) for g in got) == expected


@triton.jit
def _philox_kernel(out, seed, n, BLOCK: tl.constexpr):
    """Words of ``tl.randint4x(seed, g)`` (the noise counter) and of ``tl.philox(seed, g, 0, 1,
    0)`` (the rounding counter) for groups ``g < n``, as [n, 2, 4]."""
    g = tl.arange(0, BLOCK)
    m = g < n
    a, b, c, d = tl.randint4x(seed, g)
    tl.store(out + 8 * g, a, mask=m)
    tl.store(out + 8 * g + 1, b, mask=m)
    tl.store(out + 8 * g + 2, c, mask=m)
    tl.store(out + 8 * g + 3, d, mask=m)
    zero = g.to(tl.uint32) * 0
    a, b, c, d = tl.philox(seed, g.to(tl.uint32), zero, zero + 1, zero)
    tl.store(out + 8 * g + 4, a.to(tl.int32, bitcast=True), mask=m)
    tl.store(out + 8 * g + 5, b.to(tl.int32, bitcast=True), mask=m)
    tl.store(out + 8 * g + 6, c.to(tl.int32, bitcast=True), mask=m)
    tl.store(out + 8 * g + 7, d.to(tl.int32, bitcast=True), mask=m)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_stream_is_tritons_philox(seed):
    """For groups below 2**32: element 8g + s takes the 16-bit half s % 2 (high first) of word
    s // 2 of tl.randint4x(seed, g) as its noise field (the word's high half) and the same
    half of tl.philox(seed, g, 0, 1, 0) as its rounding field (the low half)."""
    out = torch.empty(64, 2, 4, dtype=torch.int32)
    _philox_kernel[(1,)](out, seed, 64, BLOCK=64)
    raw = out.to(torch.int64) & 0xFFFFFFFF
    halves = torch.stack([raw >> 16, raw & 0xFFFF], dim=3).reshape(64, 2, 8)
    expected = ((halves[:, 0] << 16) | halves[:, 1]).reshape(-1)
    assert torch.equal(stream.words(seed, 0, 512), expected)


def test_noise_field_does_not_depend_on_rounding():
    """Nearest rounding skips the rounding field's Philox calls: the noise is the same."""
    w = stream.words(77, 13, 300)
    assert torch.equal(stream.words(77, 13, 300, rounding=False), w & 0xFFFF0000)
    assert (w & 0xFFFF).unique().numel() > 200  # the rounding field is not constant


@pytest.mark.parametrize("cols", [128, 777, 4])
@pytest.mark.parametrize("row_offset", [0, 5, 2**31])
def test_kernel_stream_equals_torch_stream(cols, row_offset):
    seed = 987654321
    got = lf.stream_words(70, cols, seed=seed, row_offset=row_offset, backend="triton")
    assert torch.equal(got, stream.matrix_words(seed, 70, cols, row_offset))


def test_large_counters_use_the_high_word():
    """Elements past 2**35 (group index past 2**32) use the counter's second word."""
    start = (1 << 35) + 16
    assert torch.equal(lf.stream_words(1, 16, seed=3, row_offset=start // 16, backend="triton"),
                       stream.words(3, start, 16).view(1, 16))
    assert not torch.equal(stream.words(3, start, 16), stream.words(3, start - (1 << 35), 16))


def test_words_depend_only_on_seed_and_index():
    w = stream.matrix_words(42, 10, 12)
    flat = stream.words(42, 0, 120)
    assert torch.equal(w.reshape(-1), flat)
    # a window of the stream is the same window of a longer draw
    assert torch.equal(stream.words(42, 37, 50), flat[37:87])
    # a row block at an offset equals those rows of the whole
    assert torch.equal(stream.matrix_words(42, 4, 12, row_offset=6), w[6:])


@pytest.mark.parametrize("tiles", [(16, 32), (64, 128), (32, 256)])
def test_tile_size_invariance(tiles, monkeypatch, gen):
    """The kernels' output does not depend on the tile shape: the noise and rounding draws
    bit for bit; the product up to fp32 rounding (on the CPU the interpreter's tl.dot is a
    BLAS call whose blocking follows the tile; bit-exact on the GPU, tests/test_gpu.py)."""
    W = torch.randn(100, 96, generator=gen).bfloat16()
    A, B = torch.randn(4, 96, generator=gen), torch.randn(100, 4, generator=gen)
    kw = dict(seed=77, rounding="stochastic", backend="triton")
    expected = lf.merge_(W.float(), A, B, scale=0.5, noise=0.2, **kw)
    noise_only = lf.add_noise_(W.clone(), 0.2, **kw)
    monkeypatch.setattr(triton_path, "merge_config",
                        lambda *a: dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1]))
    torch.testing.assert_close(lf.merge_(W.float(), A, B, scale=0.5, noise=0.2, **kw), expected,
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(lf.add_noise_(W.clone(), 0.2, **kw), noise_only)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("cols", [96, 77])
def test_sharding_invariance(backend, cols, gen):
    """Merging row shards with their row_offset gives the whole matrix's result."""
    W = torch.randn(90, cols, generator=gen)
    A, B = torch.randn(3, cols, generator=gen), torch.randn(90, 3, generator=gen)
    kw = dict(scale=1.5, noise=0.4, seed=2024, backend=backend)
    whole = lf.merge_(W.clone(), A, B, **kw)
    shards = []
    for lo, hi in ((0, 31), (31, 64), (64, 90)):
        shards.append(lf.merge_(W[lo:hi].clone(), A, B[lo:hi], row_offset=lo, **kw))
    # on the CPU, BLAS (behind both the torch path and the interpreter's tl.dot) may block
    # the product differently per shard size: equal up to fp32 rounding (bit-exact on the
    # GPU, tests/test_gpu.py); the noise itself is bit-exact everywhere
    torch.testing.assert_close(torch.cat(shards), whole, rtol=1e-6, atol=1e-6)
    noise_whole = lf.add_noise_(W.clone(), 0.4, seed=5, backend=backend)
    noise_shards = torch.cat([lf.add_noise_(W[lo:hi].clone(), 0.4, seed=5, row_offset=lo,
                                            backend=backend) for lo, hi in ((0, 45), (45, 90))])
    assert torch.equal(noise_shards, noise_whole)


def test_stride_and_dtype_do_not_change_the_noise(gen):
    """The same logical element gets the same draw whatever the storage."""
    W = torch.zeros(64, 48)
    Wt = torch.zeros(48, 64).T
    lf.add_noise_(W, 1.0, seed=9, backend="triton")
    lf.add_noise_(Wt, 1.0, seed=9, backend="triton")
    assert torch.equal(W, Wt)
    W16 = torch.zeros(64, 48, dtype=torch.float16)
    lf.add_noise_(W16, 1.0, seed=9, backend="triton")
    assert torch.equal(W16, W.half())
