"""DoRA merge as fused in-place ops, with PEFT's semantics (``DoraLinearLayer``).

For one output feature i (a row of W, or a stored column when ``fan_in_fan_out``):

    V      = W + scale * B @ A + noise * (U - 1/2)
    W_new  = (magnitude_i / ||V_i||) * V_i

so the merged weight's output-feature norms equal the magnitude vector. This is PEFT's
``dora_factor = magnitude / weight_norm``, ``W <- dora_factor * (W + delta)``. U comes from
the library's stream at the stored element ``(row_offset + i) * W.shape[1] + j`` (as in
``merge_``); ``rounding="stochastic"`` draws the same words' low bits.

Ops (all in place under ``torch.no_grad()``, all validated before the first write):

* ``dora_merge_``: the merge above; ``weight_norm=`` supplies ||V|| instead of computing
  it (PEFT computes it from the *unmerged* base weight when other adapters are merged);
* ``dora_weight_norm``: ||V_i|| per output feature, fp32, without writing W;
* ``dora_unmerge_``: PEFT's inverse, ``W <- W / (magnitude / weight_norm) - scale * B @ A``.

Backends: ``"triton"`` (``kernels/dora_merge.py``: one launch, each program walks its
output features twice - sum of squares, then the scaled write; no temporaries),
``"torch"`` (row chunks of W; the fp32 chunk, its words and squares are bounded like
``torch_path``), ``"reference"`` (the spec: materialising fp64, below).
"""
from __future__ import annotations

import torch

from . import ops, reference, stream, torch_path, triton_path
from . import validation as v

__all__ = ["dora_merge_", "dora_weight_norm", "dora_unmerge_"]


# ----------------------------------------------------------------------------- spec

def _reference_v(W, A, B, scale, noise, seed, row_offset, fan_in_fan_out, div=None):
    """fp64 V in W's stored layout, and the stream's words for W."""
    rows, cols = W.shape
    words = stream.matrix_words(seed, rows, cols, row_offset, device=W.device)
    V = W.double()
    if div is not None:
        V = V / _feature_axis(div.double(), fan_in_fan_out)
    V = V + reference.delta_weight(A, B, scale, fan_in_fan_out)
    if noise != 0.0:
        V = V + stream.noise_from_words(words, noise).double()
    return V, words


def _feature_axis(vec, fan_in_fan_out):
    """A per-output-feature vector shaped to broadcast over W as stored."""
    return vec.view(1, -1) if fan_in_fan_out else vec.view(-1, 1)


def _reference_norm(V, fan_in_fan_out):
    return V.norm(dim=0 if fan_in_fan_out else 1)


def _reference_store(W, V, factor, words, rounding, fan_in_fan_out):
    out = (V * _feature_axis(factor, fan_in_fan_out)).float()
    W.copy_(reference.round_fp32(out, W.dtype, rounding, stream.rounding_fraction(words)))
    return W


# ----------------------------------------------------------------------------- torch path

def _torch_pass(W, A, B, *, scale, noise, seed, row_offset, rounding, fan_in_fan_out,
                div=None, post=None, magnitude=None, write=True):
    """Walk W in row chunks, forming fp32 V exactly as the kernel does.

    ``div``/``post``: fp32 per-output-feature vectors (``V = W / div + ...``, ``W <- post * V``).
    ``magnitude`` without ``post`` (rows are output features): post = magnitude / ||V_row||
    from the chunk itself. ``write=False``: return sum V^2 per output feature, W untouched.
    """
    cols = W.shape[1]
    X, Y = (A.T, B.T) if fan_in_fan_out else (B, A)
    Yf = Y.float()
    stochastic = write and rounding == "stochastic" and W.dtype != torch.float32
    ss = None if write else torch.zeros(B.shape[0], dtype=torch.float32, device=W.device)
    for r0, r1 in torch_path.row_chunks(W):
        Wc = W[r0:r1]
        if W.dtype != torch.float32:
            V = Wc.float()
        else:  # fp32: work in W itself when writing, else on a copy of the chunk
            V = Wc if write else Wc.clone()
        if div is not None:
            V.div_(div.view(1, -1) if fan_in_fan_out else div[r0:r1].view(-1, 1))
        V.addmm_(X[r0:r1].float(), Yf, alpha=scale)
        words = None
        if noise != 0.0 or stochastic:
            words = stream.words(seed, (row_offset + r0) * cols, (r1 - r0) * cols, W.device,
                                 rounding=stochastic).view(r1 - r0, cols)
            if noise != 0.0:
                V.add_(stream.noise_from_words(words, noise))
        if not write:
            if fan_in_fan_out:
                ss += V.square().sum(0)
            else:
                ss[r0:r1] = V.square().sum(1)
            continue
        if post is not None:
            V.mul_(post.view(1, -1) if fan_in_fan_out else post[r0:r1].view(-1, 1))
        elif magnitude is not None:
            V.mul_((magnitude[r0:r1].float() / V.square().sum(1).sqrt()).view(-1, 1))
        if W.dtype != torch.float32:
            frac = stream.rounding_fraction(words) if stochastic else None
            Wc.copy_(reference.round_fp32(V, W.dtype, rounding, frac))
    return ss


# ----------------------------------------------------------------------------- triton path

def _config(device: torch.device, transposed: bool) -> dict:
    """Tile shape: the interpreter (~12 ms a program) gets large tiles; on the GPU the
    contiguous axis of W gets the long side of the tile."""
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_N=128)
    if transposed:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_M=16, BLOCK_N=256, num_warps=4)


def _launch(W, A, B, *, scale, noise, seed, row_offset, rounding, fan_in_fan_out,
            magnitude=None, div=None, post=None, norm_out=None, write=True):
    """One launch of ``dora_kernel`` (see its module docstring for the modes)."""
    from .kernels import dora_merge  # imported on first use (TRITON_INTERPRET is read then)
    out_f, in_f = B.shape[0], A.shape[1]
    if out_f == 0 or in_f == 0:
        if norm_out is not None:
            norm_out.zero_()
        return
    R = A.shape[0]
    if fan_in_fan_out:  # logical out x in view of the stored in x out weight
        s_wm, s_wn = W.stride(1), W.stride(0)
        aligned8 = out_f % 8 == 0
    else:
        s_wm, s_wn = W.stride(0), W.stride(1)
        aligned8 = in_f % 8 == 0
    cfg = _config(W.device, fan_in_fan_out)
    dummy = triton_path.storage(W)  # pointer arguments that the chosen mode never reads
    post_mode = 1 if post is not None else 2 if magnitude is not None else 0
    mag = magnitude if magnitude is not None else W
    dora_merge.dora_kernel[(-(-out_f // cfg["BLOCK_M"]),)](
        triton_path.storage(W), triton_path.storage(B), triton_path.storage(A),
        triton_path.storage(mag), div if div is not None else dummy,
        post if post is not None else dummy, norm_out if norm_out is not None else dummy,
        out_f, in_f, s_wm, s_wn, B.stride(0), B.stride(1), A.stride(0), A.stride(1),
        mag.stride(0) if magnitude is not None else 0,
        float(scale), float(noise) * 2.0 ** -16, int(seed), int(row_offset),
        R=R, R_PAD=triton_path._pow2_at_least(R, 16), POST=post_mode,
        HAS_DIV=div is not None, WRITE_NORM=norm_out is not None, WRITE_W=write,
        HAS_NOISE=noise != 0.0, STOCHASTIC=rounding == "stochastic" and W.dtype != torch.float32,
        TRANSPOSED=fan_in_fan_out, ALIGNED8=aligned8, W_KIND=triton_path.STORAGE_KIND[W.dtype],
        X_KIND=triton_path.STORAGE_KIND[B.dtype], Y_KIND=triton_path.STORAGE_KIND[A.dtype],
        MAG_KIND=triton_path.STORAGE_KIND[mag.dtype] if magnitude is not None else 0, USE_DOT=R > 16,
        enable_fp_fusion=False,  # the same roundings as the torch path (memory-bound anyway)
        **cfg,
    )


# ----------------------------------------------------------------------------- public ops

def _check_vector(name, t, n):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in v.FACTOR_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one value per output feature), "
                         f"got {tuple(t.shape)}")


def _validate(W, A, B, *, rounding="nearest", seed=0, row_offset=0, fan_in_fan_out=False,
              scale=1.0, noise=0.0, backend=None, finite=True, **vectors):
    """All checks of the DoRA ops; returns (backend, scale, noise). Writes nothing.
    ``finite=False``: only the checks that read no values (the caller checks finiteness)."""
    backend = ops._check_common(W, rounding, seed, row_offset, backend)
    ops._check_factors(W, A, B, fan_in_fan_out)
    vectors = {name: t for name, t in vectors.items() if t is not None}
    for name, t in vectors.items():
        _check_vector(name, t, B.shape[0])
    v.check_same_device(W=W, A=A, B=B, **vectors)
    scale = v.check_scalar("scale", scale)
    noise = v.check_scalar("noise", noise, low=0.0)
    v.check_no_alias("W", W, A=A, B=B, **vectors)
    if finite:
        v.check_finite(A=A, B=B, **vectors)
    return backend, scale, noise


def _dora_factor(magnitude, weight_norm):
    """PEFT's ``magnitude / weight_norm`` in fp32, refused unless finite."""
    factor = magnitude.float() / weight_norm.float()
    if not bool(torch.isfinite(factor).all()):
        raise ValueError("magnitude / weight_norm is not finite (a zero weight_norm?); "
                         "nothing was written")
    return factor


@torch.no_grad()
def dora_merge_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, *,
                scale: float = 1.0, noise: float = 0.0, seed: int = 0, row_offset: int = 0,
                rounding: str = "nearest", fan_in_fan_out: bool = False,
                weight_norm: torch.Tensor | None = None, backend=None) -> torch.Tensor:
    """``W <- magnitude / ||V|| * V`` per output feature, ``V = W + scale B A + noise (U - 1/2)``.

    ``magnitude``, ``weight_norm``: length ``out`` (= ``B.shape[0]``). Without
    ``weight_norm`` the norm is of V itself, so the merged output-feature norms equal
    ``magnitude``; an output feature whose V is exactly zero becomes NaN (0/0, as in
    PEFT). With ``weight_norm`` the factor is ``magnitude / weight_norm`` (checked finite).
    Extra memory: none on CUDA (W is read twice, written once); bounded chunks on CPU.
    """
    backend, scale, noise = _validate(
        W, A, B, rounding=rounding, seed=seed, row_offset=row_offset,
        fan_in_fan_out=fan_in_fan_out, scale=scale, noise=noise, backend=backend,
        magnitude=magnitude, weight_norm=weight_norm)
    post = _dora_factor(magnitude, weight_norm) if weight_norm is not None else None
    return _merge(W, A, B, magnitude, backend, weight_norm=weight_norm, post=post, scale=scale,
                  noise=noise, seed=seed, row_offset=row_offset, rounding=rounding,
                  fan_in_fan_out=fan_in_fan_out)


def _merge(W, A, B, magnitude, backend, *, weight_norm=None, post=None, **kw):
    """``dora_merge_`` after its checks (``post``: ``magnitude / weight_norm``, already
    checked finite); ``kw``: scale, noise, seed, row_offset, rounding, fan_in_fan_out."""
    if backend == "reference":
        fifo = kw["fan_in_fan_out"]
        V, words = _reference_v(W, A, B, kw["scale"], kw["noise"], kw["seed"], kw["row_offset"],
                                fifo)
        norm = weight_norm.double() if weight_norm is not None else _reference_norm(V, fifo)
        return _reference_store(W, V, magnitude.double() / norm, words, kw["rounding"], fifo)
    if backend == "torch":
        if post is None and kw["fan_in_fan_out"]:  # output features are stored columns: two passes
            post = magnitude.float() / _torch_pass(W, A, B, write=False, **kw).sqrt()
        _torch_pass(W, A, B, post=post, magnitude=magnitude, **kw)
        return W
    _launch(W, A, B, magnitude=magnitude if post is None else None, post=post, **kw)
    return W


@torch.no_grad()
def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0,
                     noise: float = 0.0, seed: int = 0, row_offset: int = 0,
                     fan_in_fan_out: bool = False, backend=None) -> torch.Tensor:
    """``||W + scale B A + noise (U - 1/2)||`` per output feature (fp32, length ``out``).

    PEFT's ``DoraLinearLayer.get_weight_norm``; W is only read. Extra memory: the vector
    (plus bounded chunks on CPU).
    """
    backend, scale, noise = _validate(W, A, B, seed=seed, row_offset=row_offset,
                                      fan_in_fan_out=fan_in_fan_out, scale=scale, noise=noise,
                                      backend=backend)
    kw = dict(scale=scale, noise=noise, seed=seed, row_offset=row_offset, rounding="nearest",
              fan_in_fan_out=fan_in_fan_out)
    if backend == "reference":
        V, _ = _reference_v(W, A, B, scale, noise, seed, row_offset, fan_in_fan_out)
        return _reference_norm(V, fan_in_fan_out).float()
    if backend == "torch":
        return _torch_pass(W, A, B, write=False, **kw).sqrt()
    out = torch.empty(B.shape[0], dtype=torch.float32, device=W.device)
    _launch(W, A, B, norm_out=out, write=False, **kw)
    return out


@torch.no_grad()
def dora_unmerge_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                  weight_norm: torch.Tensor, *, scale: float = 1.0, fan_in_fan_out: bool = False,
                  backend=None) -> torch.Tensor:
    """PEFT's DoRA unmerge: ``W <- W / (magnitude / weight_norm) - scale B A`` per output feature.

    ``weight_norm`` is the one the merge used. One pass over W, nearest rounding.
    """
    backend, scale, _ = _validate(W, A, B, fan_in_fan_out=fan_in_fan_out, scale=scale,
                                  backend=backend, magnitude=magnitude, weight_norm=weight_norm)
    factor = _dora_factor(magnitude, weight_norm)
    kw = dict(scale=-scale, noise=0.0, seed=0, row_offset=0, rounding="nearest",
              fan_in_fan_out=fan_in_fan_out)
    if backend == "reference":
        V, words = _reference_v(W, A, B, -scale, 0.0, 0, 0, fan_in_fan_out,
                                div=magnitude.double() / weight_norm.double())
        return _reference_store(W, V, torch.ones_like(factor, dtype=torch.float64), words,
                                "nearest", fan_in_fan_out)
    if backend == "torch":
        _torch_pass(W, A, B, div=factor, **kw)
        return W
    _launch(W, A, B, div=factor, **kw)
    return W
