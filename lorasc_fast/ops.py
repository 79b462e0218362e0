"""The public ops: validate everything, then dispatch to a backend.

``backend=None`` runs the Triton kernels on CUDA tensors and the memory-lean torch path
elsewhere; ``"triton"`` forces the kernels (on CPU tensors through Triton's interpreter);
``"torch"`` the torch path; ``"reference"`` the materialising spec. All ops work in
place and never record autograd history. Every check runs before the first write, so
a rejected call leaves every tensor bit-identical.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference, torch_path, triton_path
from . import validation as v

__all__ = ["lowrank_moments", "merge_", "add_noise_", "ema_", "cascade_merge_", "stream_words"]


def _check_common(W, rounding, seed, row_offset, backend):
    v.check_weight(W)
    v.check_rounding(rounding)
    v.check_index("seed", seed, v.SEED_LIMIT)
    v.check_index("row_offset", row_offset)
    return v.resolve_backend(backend, W.device)


def _check_factors(W, A, B, fan_in_fan_out, a_name="A", b_name="B"):
    v.check_factor(a_name, A)
    v.check_factor(b_name, B)
    v.check_pair_shapes(A, B, a_name, b_name)
    v.check_merge_shapes(W, A, B, fan_in_fan_out)


@torch.no_grad()
def lowrank_moments(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, *, backend=None):
    """Mean and unbiased std of ``scale * B @ A`` as 0-d fp32 tensors.

    From r x r Grams: ``sum = s (1^T B)(A 1)``, ``||M||^2 = s^2 sum((B^T B) * (A A^T))``.
    Never forms the out x in product; extra memory is O(r^2) (torch path: fp64 factor copies).
    """
    v.check_factor("A", A)
    v.check_factor("B", B)
    v.check_pair_shapes(A, B)
    v.check_same_device(A=A, B=B)
    scale = v.check_scalar("scale", scale)
    backend = v.resolve_backend(backend, A.device)
    if backend == "reference":
        v.check_finite(A=A, B=B)
        return reference.lowrank_moments(A, B, scale)
    # NaN or Inf in a factor reaches the Grams: a finite std proves finite factors (one sync)
    if backend == "torch":
        mean, std = torch_path.lowrank_moments(A, B, scale)
    else:
        mean, std = triton_path.moments(A, B, scale)
    _check_std(std, dict(A=A, B=B), "scale * B @ A")
    return mean, std


@torch.no_grad()
def merge_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0,
           noise: float = 0.0, seed: int = 0, row_offset: int = 0, rounding: str = "nearest",
           fan_in_fan_out: bool = False, backend=None) -> torch.Tensor:
    """``W += scale * B @ A + noise * (U - 0.5)`` in place, one pass over W.

    ``fan_in_fan_out``: W is stored in x out (transformers Conv1D), the delta is transposed.
    ``noise`` is the width of the uniform; U comes from the library's Philox stream at
    global element ``(row_offset + i) * W.shape[1] + j``. ``rounding="stochastic"`` rounds the
    fp32 result to bf16/fp16 unbiasedly. Extra memory: none on CUDA; bounded chunks on CPU.
    """
    backend = _check_common(W, rounding, seed, row_offset, backend)
    _check_factors(W, A, B, fan_in_fan_out)
    v.check_same_device(W=W, A=A, B=B)
    scale = v.check_scalar("scale", scale)
    noise = v.check_scalar("noise", noise, low=0.0)
    v.check_no_alias("W", W, A=A, B=B)
    kw = dict(scale=scale, noise=noise, seed=seed, row_offset=row_offset, rounding=rounding,
              fan_in_fan_out=fan_in_fan_out)
    if backend != "triton":
        v.check_finite(A=A, B=B)
        return _merge(W, A, B, backend, **kw)
    # the finite check and the merge are queued together; the merge writes nothing if the
    # check fails, and the one host sync comes after both
    flag = triton_path.nonfinite_flag([A, B])
    _merge(W, A, B, backend, flag=flag, **kw)
    if flag.item():
        v.check_finite(A=A, B=B)  # names the culprits
        raise ValueError("non-finite values (NaN or Inf) in A or B")
    return W


def _merge(W, A, B, backend, *, fan_in_fan_out, flag=None, **kw):
    if backend == "reference":
        return reference.merge_(W, A, B, fan_in_fan_out=fan_in_fan_out, **kw)
    if backend == "torch":
        return torch_path.merge_(W, A, B, fan_in_fan_out=fan_in_fan_out, **kw)
    X, Y = (A.T, B.T) if fan_in_fan_out else (B, A)
    triton_path.launch_merge(W, X, Y, flag=flag, **kw)
    return W


@torch.no_grad()
def add_noise_(W: torch.Tensor, noise: float, *, seed: int = 0, row_offset: int = 0,
               rounding: str = "nearest", backend=None) -> torch.Tensor:
    """``W += noise * (U - 0.5)`` in place, from the same stream as ``merge_``."""
    backend = _check_common(W, rounding, seed, row_offset, backend)
    noise = v.check_scalar("noise", noise, low=0.0)
    kw = dict(noise=noise, seed=seed, row_offset=row_offset, rounding=rounding)
    if backend == "reference":
        return reference.add_noise_(W, **kw)
    if backend == "torch":
        return torch_path.add_noise_(W, **kw)
    triton_path.launch_merge(W, None, None, scale=1.0, has_delta=False, **kw)
    return W


@torch.no_grad()
def ema_(slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float, *,
         backend=None) -> None:
    """``slow = alpha * slow + (1 - alpha) * fast`` for every pair, in place.

    On CUDA two launches per (slow dtype, fast dtype) combination cover all pairs: the
    non-finite check of the fast tensors, then the update (which writes nothing if the check
    failed); their address tables are cached per set of tensors. One host sync per call (a
    second one when some pairs are strided: those are checked on the host first).
    """
    slow, fast = list(slow), list(fast)
    v.check_sequences(slow, fast)
    alpha = v.check_scalar("alpha", alpha, low=0.0, high=1.0)
    if not slow:
        return
    v.check_same_device(**{f"slow[{i}]": s for i, s in enumerate(slow)})
    backend = v.resolve_backend(backend, slow[0].device)
    if backend != "triton":
        v.check_finite(**{f"fast[{i}]": f for i, f in enumerate(fast)})
        return _ema(slow, fast, alpha, backend)
    dense, strided = _split_dense(slow, fast)
    v.check_finite(**{f"fast[{i}]": fast[i] for i in strided})
    # the dense pairs' check pass and write pass are queued together (one sync, after both)
    flag = triton_path.ema_([slow[i] for i in dense], [fast[i] for i in dense], alpha, check=True)
    if flag is not None and flag.item():
        v.check_finite(**{f"fast[{i}]": f for i, f in enumerate(fast)})  # names the culprits
        raise ValueError("non-finite values (NaN or Inf) in fast")
    torch_path.ema_([slow[i] for i in strided], [fast[i] for i in strided], alpha)


def _split_dense(slow, fast):
    """Indices of the pairs the Triton kernel takes (both contiguous), and of the others."""
    dense = [i for i, (s, f) in enumerate(zip(slow, fast)) if s.is_contiguous() and f.is_contiguous()]
    taken = set(dense)
    return dense, [i for i in range(len(slow)) if i not in taken]


def _ema(slow, fast, alpha, backend):
    if backend == "reference":
        return reference.ema_(slow, fast, alpha)
    if backend == "torch":
        return torch_path.ema_(slow, fast, alpha)
    dense, strided = _split_dense(slow, fast)
    triton_path.ema_([slow[i] for i in dense], [fast[i] for i in dense], alpha)
    torch_path.ema_([slow[i] for i in strided], [fast[i] for i in strided], alpha)


@torch.no_grad()
def cascade_merge_(W, A_slow, B_slow, A_fast, B_fast, *, alpha: float, scale: float = 1.0,
                   noise_lambda: float = 0.0, seed: int = 0, row_offset: int = 0,
                   rounding: str = "nearest", fan_in_fan_out: bool = False, backend=None):
    """One cascade boundary for one layer; returns ``std(scale * B_slow @ A_slow)`` (0-d fp32).

    1. ``slow = alpha * slow + (1 - alpha) * fast`` (written into A_slow, B_slow);
    2.-3. ``W += scale * B_slow @ A_slow + noise_lambda * std * (U - 0.5)`` in one pass.
    The std of the EMA'd product is computed on the fly from r x r Grams and checked
    before anything is written. Extra memory: O(r^2) on CUDA.
    """
    backend = _check_common(W, rounding, seed, row_offset, backend)
    _check_factors(W, A_slow, B_slow, fan_in_fan_out, "A_slow", "B_slow")
    v.check_cascade_pairs(W, A_slow, B_slow, A_fast, B_fast)
    alpha = v.check_scalar("alpha", alpha, low=0.0, high=1.0)
    scale = v.check_scalar("scale", scale)
    noise_lambda = v.check_scalar("noise_lambda", noise_lambda, low=0.0)
    kw = dict(scale=scale, seed=seed, row_offset=row_offset, rounding=rounding,
              fan_in_fan_out=fan_in_fan_out)
    factors = dict(A_slow=A_slow, B_slow=B_slow, A_fast=A_fast, B_fast=B_fast)
    if backend == "reference":
        v.check_finite(**factors)
    # NaN or Inf in any factor reaches the Grams, so a finite std proves finite factors.
    std = _cascade_std(A_slow, B_slow, A_fast, B_fast, alpha, scale, backend)
    std_value = _check_std(std, factors, "scale * B_slow @ A_slow")
    if backend == "reference":
        return reference.cascade_merge_(W, A_slow, B_slow, A_fast, B_fast, alpha=alpha,
                                        noise_lambda=noise_lambda, **kw)
    _ema([A_slow, B_slow], [A_fast, B_fast], alpha, backend)
    _merge(W, A_slow, B_slow, backend, noise=noise_lambda * std_value, **kw)
    return std


def _cascade_std(A_slow, B_slow, A_fast, B_fast, alpha, scale, backend) -> torch.Tensor:
    """The 0-d fp32 std of the EMA'd slow product ``scale * B_slow @ A_slow``, nothing written:
    the spec on EMA'd copies of the slow factors, or the backend's moments with the EMA taken
    on the fly."""
    if backend == "reference":
        probe = [t.clone() for t in (A_slow, B_slow)]
        reference.ema_(probe, [A_fast, B_fast], alpha)
        return reference.lowrank_moments(probe[0], probe[1], scale)[1]
    moments = torch_path.lowrank_moments if backend == "torch" else triton_path.moments
    return moments(A_slow, B_slow, scale, ema=(A_fast, B_fast, alpha))[1]


def _check_std(std: torch.Tensor | float, factors: dict, what: str) -> float:
    """The std (a 0-d tensor or a host float) as a float; if it is not finite, say whether a
    factor or fp32 range is to blame."""
    value = float(std)
    if value != value or value in (float("inf"), float("-inf")):
        v.check_finite(**factors)
        raise ValueError(f"the std of {what} is {value}; the factors overflow fp32 - "
                         "nothing was written")
    return value


@torch.no_grad()
def stream_words(rows: int, cols: int, *, seed: int = 0, row_offset: int = 0, device=None,
                 backend=None) -> torch.Tensor:
    """The stream's 32-bit words (int64 in [0, 2**32)) of a rows x cols block starting at
    global row ``row_offset``: exactly what the ops draw for noise and rounding."""
    v.check_index("rows", rows)
    v.check_index("cols", cols)
    v.check_index("seed", seed, v.SEED_LIMIT)
    v.check_index("row_offset", row_offset)
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = v.resolve_backend(backend, device)
    if backend == "triton":
        return triton_path.stream_words(rows, cols, seed, row_offset, device)
    from . import stream
    return stream.matrix_words(seed, rows, cols, row_offset, device)
