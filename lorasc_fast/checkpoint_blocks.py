"""One base tensor of ``lorasc merge`` turned into output bytes, a block of rows at a time.

For a merged weight W (rows of the stored matrix: out for Linear, in for Conv1D/Embedding,
i.e. ``fan_in_fan_out``), block ``[i0, i1)`` is read from the shard, moved to the device and

    W[i0:i1] += scaling * (B @ A)[i0:i1]        ops.merge_(..., row_offset=i0)

with ``B[i0:i1]`` (or ``A[:, i0:i1]`` when fan_in_fan_out): the same random stream, and on the
torch path bit for bit what merging the whole W at once gives (the Triton launch configuration
follows the block's shape, which can move an fp32 result by one ulp). DoRA goes through
``dora_merge_`` instead, ``W <- magnitude / ||W + sBA|| * (W + sBA)`` per output feature, with
the norm from a first pass (``dora_norm``; per output row, or over the stored columns for
fan_in_fan_out). When ``--dtype`` changes the dtype, the block is merged in fp32 and rounded
once to the output dtype. ``lora_B.bias``: ``b += scaling * lora_bias`` through ``merge_``,
as a 1 x out matrix ``b`` with ``A = lora_bias``, ``B = [[1]]``.

Memory: one block of about ``block_bytes`` (a block never splits a row; with a dtype change
also its fp32 and output copies), the factor slices, and for DoRA one vector of length out.
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

import torch

from . import ops
from .checkpoint_errors import MergeError
from .checkpoint_plan import TensorPlan
from .checkpoint_safetensors import DTYPES, Header, read_rows
from .dora import dora_merge_, dora_weight_norm
from .reference import round_fp32
from .stream import rounding_fraction


def row_blocks(plan: TensorPlan, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``[i0, i1)`` ranges over the tensor's first dimension, ~block_bytes of fp32 each, in
    multiples of 8 rows: the torch path's products then group rows as one product over the
    whole tensor would (``torch_path.chunk_rows``), so the result does not depend on the
    block size and an fp32 merge equals PEFT's bit for bit."""
    rows = plan.info.rows
    if plan.bias_of is not None:  # one block: the op's stream index runs over the whole vector
        step = max(1, rows)
    else:
        row_numel = plan.info.numel // rows if rows else 0
        step = max(8, block_bytes // max(1, 4 * row_numel) // 8 * 8)
    for i0 in range(0, rows, step):
        yield i0, min(rows, i0 + step)


def source_rows(plan: TensorPlan, f: BinaryIO | None, header: Header, i0: int, i1: int):
    """Rows of the tensor PEFT would hold after loading the adapter: the base's, or the
    adapter's full replacement cast to the base dtype."""
    if plan.replace is not None:
        rows = plan.replace[i0:i1] if plan.info.shape else plan.replace  # a scalar: one block
        return rows.to(plan.info.torch_dtype, copy=True)
    return read_rows(f, header, plan.info, i0, i1)


def round_to(work: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int, row_offset: int):
    """fp32 ``work`` (a row block) to ``dtype``; stochastic rounding draws the same stream
    words (low 16 bits) the ops use for these elements."""
    if work.dtype == dtype:
        return work
    if rounding == "nearest" or dtype == torch.float32:
        return work.to(dtype)
    rows, cols = work.shape
    words = ops.stream_words(rows, cols, seed=seed, row_offset=row_offset, device=work.device)
    return round_fp32(work, dtype, "stochastic", rounding_fraction(words))


class Factors:
    """A module's LoRA factors on the merge device, sliced to a row block of the stored W."""

    def __init__(self, plan: TensorPlan, device: torch.device):
        m = plan.module if plan.module is not None else plan.bias_of
        self.m, self.weight = m, plan.module is not None
        if self.weight:
            self.A, self.B = m.A.to(device), m.B.to(device)
            self.magnitude = None if m.magnitude is None else m.magnitude.to(device)
        else:
            self.A, self.B = m.bias.to(device).view(1, -1), torch.ones(1, 1, device=device)
            self.magnitude = None

    def rows(self, i0: int, i1: int):
        if not self.weight:
            return self.A, self.B, False
        if self.m.fan_in_fan_out:
            return self.A[:, i0:i1].contiguous(), self.B, True
        return self.A, self.B[i0:i1], False


def _merge_work(work, factors: Factors, plan: TensorPlan, i0: int, i1: int, rounding: str):
    """``work`` (a block of rows of W) += the block's delta, with DoRA's rescale when the plan
    has one; in place, through the fused ops."""
    A, B, fiffo = factors.rows(i0, i1)
    kw = dict(scale=factors.m.scaling, seed=plan.seed, row_offset=i0, fan_in_fan_out=fiffo,
              rounding=rounding if work.dtype != torch.float32 else "nearest")
    if plan.dora_norm is None:
        ops.merge_(work, A, B, **kw)
        return
    mag, norm = factors.magnitude, plan.dora_norm
    if not fiffo:
        mag, norm = mag[i0:i1], norm[i0:i1]
    dora_merge_(work, A, B, mag, weight_norm=norm, **kw)


def dora_norm(plan: TensorPlan, f: BinaryIO | None, header: Header, device: torch.device,
              block_bytes: int) -> torch.Tensor:
    """``||W + scaling * B @ A||`` per output feature (fp32, on ``device``), PEFT's
    ``DoraLinearLayer.get_weight_norm``, from row blocks: per block for Linear, summed in
    fp64 over blocks for fan_in_fan_out. A ``magnitude / norm`` that is not finite (a zero
    norm) is an error, raised before anything is written."""
    factors = Factors(plan, device)
    m = factors.m
    sumsq = torch.zeros(m.out_features, dtype=torch.float64, device=device)
    for i0, i1 in row_blocks(plan, block_bytes):
        blk = source_rows(plan, f, header, i0, i1).to(device)
        A, B, fiffo = factors.rows(i0, i1)
        n = dora_weight_norm(blk, A, B, scale=m.scaling, fan_in_fan_out=fiffo).double()
        if fiffo:
            sumsq += n.square()
        else:
            sumsq[i0:i1] = n.square()
    norm = sumsq.sqrt().float()
    if not bool(torch.isfinite(factors.magnitude / norm).all()):
        raise MergeError(f"DoRA: ||W + s*B@A|| is zero or not finite in some output feature of "
                         f"{plan.name!r}; the merged weight would not be finite")
    return norm


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, from one min/max pass (NaN propagates through both)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _output_block(plan: TensorPlan, f, header: Header, factors: Factors | None,
                  device: torch.device, rounding: str, i0: int, i1: int) -> torch.Tensor:
    out_dtype = DTYPES[plan.out_dtype]
    blk = source_rows(plan, f, header, i0, i1)
    if factors is None:
        return blk if blk.dtype == out_dtype else blk.to(out_dtype)
    blk = blk.to(device)
    if plan.bias_of is not None:
        blk = blk.view(1, -1)
    work = blk if blk.dtype == out_dtype else blk.float()  # else: merge in fp32, round once
    _merge_work(work, factors, plan, i0, i1, rounding)
    out = round_to(work, out_dtype, rounding, plan.seed, i0)
    if not _all_finite(out):
        raise MergeError(f"merging into {plan.name!r} gives non-finite values "
                         f"(overflow in {plan.out_dtype}, or a non-finite base weight)")
    return out.cpu().view(-1) if plan.bias_of is not None else out.cpu()


def output_blocks(plan: TensorPlan, f: BinaryIO | None, header: Header, device: torch.device,
                  rounding: str, block_bytes: int) -> Iterator[torch.Tensor]:
    """The output tensor's data, as CPU tensors of ``plan.out_dtype`` in row order. Only the
    block just yielded is referenced here: consumers should drop it before asking for the next
    one, so that at most one block is alive."""
    touched = plan.module is not None or plan.bias_of is not None
    factors = Factors(plan, device) if touched else None
    for i0, i1 in row_blocks(plan, block_bytes):
        block = _output_block(plan, f, header, factors, device, rounding, i0, i1)
        yield block
        del block
