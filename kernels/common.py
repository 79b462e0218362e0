"""Triton helpers shared by the fused ops: the random stream and fp32 -> storage rounding.

Not an op itself. The stream is the one specified in ``lorasc_fast.stream``: element
``e = global_row * ncols + col`` takes the 16-bit half ``e % 2`` of word ``(e % 8) // 2`` of
``philox(seed, (e // 8) lo, (e // 8) hi, 0, 0)`` as its noise field (the high half of its
word) and the same half of ``philox(seed, (e // 8) lo, (e // 8) hi, 1, 0)`` as its
stochastic-rounding field (the low half); Philox4x32-10, bit for bit ``tl.philox``.

Storage kinds (``W_KIND``): 0 fp32, 1 fp16, 2 bf16 as its int16 bit pattern, 3 bf16.
Kind 2 is for Triton's interpreter (whose own fp32 -> bf16 cast truncates): the
conversion is integer arithmetic, exactly round-to-nearest-even. Kind 3 is for the GPU:
the hardware conversion (``cvt.rn.bf16x2.f32``, two elements per instruction) rounds the
same way, instead of ~7 integer operations per element. The two differ only in the bit
pattern of a NaN result (0x7FC0 with kind 2, the hardware's canonical NaN with kind 3).
"""
import os

import triton
import triton.language as tl

# PTX (``centred_from_words``) everywhere but in Triton's interpreter, which is switched on
# before the kernels are imported (lorasc_fast.triton_path)
FUNNEL_SHIFT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")

KIND_FP32: tl.constexpr = 0
KIND_FP16: tl.constexpr = 1
KIND_BF16: tl.constexpr = 2
KIND_BF16_NATIVE: tl.constexpr = 3


@triton.jit
def _mulhilo(a: tl.constexpr, x):
    """High and low words of ``a * x`` from one widening multiply (``mul.wide.u32``: one
    ``IMAD.WIDE.U32`` on sm_90 where ``tl.math.umulhi`` plus ``*`` take two instructions)."""
    p = x.to(tl.uint64) * a
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox_groups(seed, g, C2: tl.constexpr):
    """The four words of Philox4x32-10 with key ``(seed lo, seed hi)`` and counter
    ``(g lo, g hi, C2, 0)`` for an int64 tensor ``g``: bit for bit ``tl.philox`` (same
    constants and round order), with each round's two multiplies widening ones."""
    seed64 = seed.to(tl.uint64)  # a tensor: kernels taking a seed never specialise it
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed64 >> 32).to(tl.uint32)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c3 = c0 * 0
    c2 = c3 + C2
    for _ in tl.static_range(10):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _place(half_word, odd, HIGH: tl.constexpr):
    """The high (even slot) or low (odd slot) 16 bits of ``half_word``, moved to the high
    (``HIGH``) or low half of a uint32."""
    if HIGH:
        return tl.where(odd, half_word << 16, half_word & 0xFFFF0000)
    else:
        return tl.where(odd, half_word & 0xFFFF, half_word >> 16)


@triton.jit
def _field(seed, g, e, C2: tl.constexpr, HIGH: tl.constexpr, ALIGNED8: tl.constexpr):
    """One 16-bit field (Philox counter word 2 = ``C2``) of every element of a tile, in the
    high or low half of a uint32, shaped like ``e`` (the int64 stream indices).

    With ``ALIGNED8``, ``g`` holds the group ``e // 8`` of each run of eight consecutive
    elements along ``e``'s last dimension (``g.shape == e.shape[:-1] + [e.shape[-1] // 8]``,
    each run starting at a multiple of 8): one Philox call per group, its eight fields
    placed in slot order. Otherwise each element computes its group's call and keeps its
    half (``g`` is not read)."""
    if ALIGNED8:
        c0, c1, c2, c3 = _philox_groups(seed, g, C2)
        words = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # [..., 2, 2]: c0 c1 c2 c3
        if HIGH:
            pair = tl.join(words & 0xFFFF0000, words << 16)
        else:
            pair = tl.join(words >> 16, words & 0xFFFF)
        return tl.reshape(pair, e.shape)  # slot order: c0 high, c0 low, c1 high, ...
    else:
        c0, c1, c2, c3 = _philox_groups(seed, e // 8, C2)
        k = (e % 8) // 2
        word = tl.where(k == 0, c0, tl.where(k == 1, c1, tl.where(k == 2, c2, c3)))
        return _place(word, (e % 2) == 1, HIGH)


@triton.jit
def tile_words(seed, g, e, ALIGNED8: tl.constexpr, NOISE: tl.constexpr,
               ROUNDING: tl.constexpr):
    """uint32 words of a tile of any shape, given its int64 stream indices ``e`` (and, with
    ``ALIGNED8``, the groups ``g`` of ``_field``).

    High half: the noise field (one Philox call per 8 elements, counter word 2 = 0), if
    ``NOISE``; low half: the stochastic-rounding field (counter word 2 = 1), if
    ``ROUNDING``; a field not asked for is zero.
    """
    if NOISE:
        w = _field(seed, g, e, 0, True, ALIGNED8)
        if ROUNDING:
            w = w | _field(seed, g, e, 1, False, ALIGNED8)
    else:
        w = _field(seed, g, e, 1, False, ALIGNED8)
    return w


@triton.jit
def stream_words(seed, rows, col0, cols, ncols, ALIGNED8: tl.constexpr,
                 NOISE: tl.constexpr, ROUNDING: tl.constexpr):
    """``tile_words`` of a [len(rows), len(cols)] tile; ``rows`` are global int64 row indices.
    ``ALIGNED8``: ``ncols % 8 == 0`` and ``cols == col0 + arange(BN)`` with ``col0`` and
    ``BN`` multiples of 8."""
    BN: tl.constexpr = cols.shape[0]
    g = ((rows * ncols + col0) // 8)[:, None] + tl.arange(0, BN // 8)[None, :].to(tl.int64)
    e = rows[:, None] * ncols + cols[None, :].to(tl.int64)
    return tile_words(seed, g, e, ALIGNED8, NOISE, ROUNDING)


@triton.jit
def centred_from_words(w, LOW_ZERO: tl.constexpr):
    """fp32 ``hi - 32767.5`` (exact) with ``hi = w >> 16``, so ``U - 0.5 = centred / 2**16``.

    ``hi`` becomes a float without an int -> float conversion: its 16 bits are placed at
    the top of the mantissa of 2**16 (``2**16 + hi`` exactly), and subtracting
    ``2**16 + 32767.5`` is exact, so the value is the same as ``hi.to(float32) - 32767.5``.

    ``LOW_ZERO``: ``w``'s low half is zero (no stochastic-rounding field in it). On the GPU
    the float's bits are then one funnel shift, ``(0x8F : w) >> 9`` (``SHF.R.W``: the
    exponent of 2**16 comes in from the left), instead of a shift, a mask and an or — the
    same bits, one instruction per element less (``bench/sass_merge.py``). The interpreter
    (``TRITON_INTERPRET=1``, no PTX) always takes the integer form.
    """
    if FUNNEL_SHIFT:
        if not LOW_ZERO:
            w = w & 0xFFFF0000
        bits = tl.inline_asm_elementwise("shf.r.wrap.b32 $0, $1, 0x8F, 9;", "=r,r", [w],
                                         dtype=tl.uint32, is_pure=True, pack=1)
    else:
        bits = ((w >> 9) & 0x007FFF80) | 0x47800000
    return bits.to(tl.float32, bitcast=True) - 98303.5


@triton.jit
def noise_from_words(w, noise_scaled, LOW_ZERO: tl.constexpr):
    """fp32 ``noise * (U - 0.5)`` with ``U = ((w >> 16) + 0.5) / 2**16``.

    ``noise_scaled`` is ``noise / 2**16``; since that scaling is exact, the product
    equals ``((hi - 32767.5) / 2**16) * noise`` bit for bit (``lorasc_fast.stream``).
    """
    return centred_from_words(w, LOW_ZERO) * noise_scaled


@triton.jit
def flag_nonfinite(x, FLAG):
    """``FLAG <- 1`` (an int32) if the tile ``x`` holds a NaN or an Inf; never cleared here."""
    bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)
    if bad > 0:
        tl.store(FLAG, 1)


@triton.jit
def split_tf32(t):
    """``t = hi + lo`` exactly: ``hi`` is ``t`` rounded to TF32's 10 fraction bits (to nearest,
    ties away from zero, like ``cvt.rna.tf32.f32``), so ``|lo| <= 2**-11 |t|``; the tensor
    cores read ``hi`` unchanged and ``lo`` to its top 11 bits. Finite ``t`` only."""
    hi = ((t.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, t - hi


@triton.jit
def dot_3xtf32(x_hi, x_lo, y_hi, y_lo):
    """``x @ y`` to about fp32 accuracy from three TF32 tensor-core products:
    ``x_lo y_hi + x_hi y_lo + x_hi y_hi`` (the dropped ``x_lo y_lo`` and the TF32 reading
    of ``lo`` cost at most ~2**-21 of ``|x| |y|`` per term). Unlike ``input_precision="tf32x3"``
    there is no per-element NaN guard on the small products (2 instructions per element on
    sm_90, ``bench/sass_merge.py``): callers pass finite factors, and a NaN or Inf in them
    propagates either way."""
    d = tl.dot(x_lo, y_hi, input_precision="tf32")
    d = tl.dot(x_hi, y_lo, d, input_precision="tf32")
    return tl.dot(x_hi, y_hi, d, input_precision="tf32")


@triton.jit
def load_f32(ptrs, mask, KIND: tl.constexpr):
    """Load a tile stored as ``KIND`` (bf16 as int16 bits) and widen it to fp32 exactly."""
    if KIND == 2:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_f32_unmasked(ptrs, KIND: tl.constexpr):
    """``load_f32`` of a tile known to be in bounds."""
    if KIND == 2:
        return (tl.load(ptrs).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def _bf16_nearest_bits(v):
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def _bf16_stochastic_bits(v, frac16):
    u = v.to(tl.uint32, bitcast=True)
    r = (u + frac16) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def _fp16_stochastic(v, frac16):
    # ulp of fp16 at |v|: 2**(max(floor(log2|v|), -14) - 10), built from exponent bits;
    # v * (1 / ulp) is exact, and the comparison rounds up with probability frac.
    ebits = ((v.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    ulp_exp = tl.maximum(ebits - 127, -14) - 10
    ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)
    q = v * inv_ulp
    down = tl.floor(q)
    up = (frac16.to(tl.float32) * (1.0 / 65536.0)) < (q - down)
    out = (down + up.to(tl.float32)) * ulp
    out = tl.where((v - v) == 0.0, out, v)  # keep inf and nan
    return out.to(tl.float16)


@triton.jit
def store_rounded(ptrs, v, mask, words, KIND: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store fp32 ``v`` as ``KIND``: round-to-nearest-even, or stochastic with ``words & 0xFFFF``."""
    if KIND == 3:
        if STOCHASTIC:
            tl.store(ptrs, _bf16_stochastic_bits(v, words & 0xFFFF).to(tl.bfloat16, bitcast=True),
                     mask=mask)
        else:
            tl.store(ptrs, v.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
    elif KIND == 0:
        tl.store(ptrs, v, mask=mask)
    elif KIND == 1:
        if STOCHASTIC:
            tl.store(ptrs, _fp16_stochastic(v, words & 0xFFFF), mask=mask)
        else:
            tl.store(ptrs, v.to(tl.float16), mask=mask)
    else:
        if STOCHASTIC:
            tl.store(ptrs, _bf16_stochastic_bits(v, words & 0xFFFF), mask=mask)
        else:
            tl.store(ptrs, _bf16_nearest_bits(v), mask=mask)


@triton.jit
def as_pointer(addr, KIND: tl.constexpr):
    """An int64 address as a pointer: kinds 0 fp32, 1 fp16, 2 bf16 as int16 bits, 3 bf16."""
    if KIND == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        return addr.to(tl.pointer_type(tl.float16))
    elif KIND == 2:
        return addr.to(tl.pointer_type(tl.int16))
    else:
        return addr.to(tl.pointer_type(tl.bfloat16))
