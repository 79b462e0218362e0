"""The queued non-finite check (kernels/finite.py via triton_path.nonfinite_flag)."""
import pytest
import torch

from lorasc_fast import triton_path
from helpers import DTYPES


def _flag(tensors):
    return int(triton_path.nonfinite_flag(tensors).item())


CASES = [(None, 0)] + [(bad, where) for bad in (float("nan"), float("inf"), float("-inf"))
                       for where in range(4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad,where", CASES)
def test_flag_finds_one_bad_element_in_any_of_four(dtype, bad, where, gen):
    ts = [torch.randn(s, generator=gen).to(dtype) for s in ((3, 6000), (70, 3), (1, 1), (17000, 2))]
    if bad is not None:  # the last element: for tensors 0 and 3 in the tail block (the
        ts[where].view(-1)[-1] = bad  # interpreter's block is 2**14 elements)
    assert _flag(ts) == (bad is not None)


def test_flag_strided_extra_and_empty_tensors(gen):
    dense = [torch.randn(4, 6, generator=gen) for _ in range(4)]
    strided = torch.randn(6, 4, generator=gen).T  # non-contiguous: torch reduction path
    empty = torch.empty(0, 3)
    assert _flag(dense + [strided, empty]) == 0
    strided[1, 2] = float("nan")
    assert _flag(dense + [strided, empty]) == 1
    fifth = torch.randn(3, 3, generator=gen)  # a fifth contiguous tensor: also the torch path
    fifth[2, 2] = float("inf")
    assert _flag(dense + [fifth]) == 1


def test_flag_ignores_large_finite_values():
    big = [torch.tensor([[torch.finfo(dt).max, -torch.finfo(dt).max]], dtype=dt) for dt in DTYPES]
    assert _flag(big) == 0
