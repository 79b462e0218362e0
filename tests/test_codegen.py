"""What the compiler makes of the merge kernels for the H100/H200 (sm_90), on any machine.

Triton's bundled ptxas and nvdisasm compile the kernels without a GPU
(``bench/sass_merge.py``); these tests pin the machine-code properties the H200
measurements depend on (``bench/NOTES.md``), so a change that loses them fails in CI
instead of in the next GPU session. Counts, not times.
"""
import os

import pytest

from helpers import run_probe

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")

PROBE = """
import collections, json, sys
sys.path.insert(0, sys.argv[1])
import sass_merge as sm

def loop(kernel, elements):
    ops = sm.loop_body(sm.disassemble(kernel.asm["cubin"]))
    return dict(per_element=len(ops) / elements, ops=collections.Counter(ops))

# the default r <= 32 tile: 64 x 64, 4 warps (32 elements per thread), 3 stages
print(json.dumps(dict(
    merge=loop(sm.compile_merge(16, 64, 64, 4, 3, noise=False, stochastic=False), 32),
    noise=loop(sm.compile_merge(16, 64, 64, 4, 3, noise=True, stochastic=False), 32),
    sr=loop(sm.compile_merge(16, 64, 64, 4, 3, noise=True, stochastic=True), 32),
    grouped=loop(sm.compile_group_merge(16, 64, 64, 4, 3, noise=True), 32))))
"""

ONES = """
import sys
sys.path.insert(0, sys.argv[1])
import sass_merge as sm
sm.compile_merge(16, 64, 64, 4, 3, noise=True, stochastic=True,
                 ones=("ROW_PROGRAMS", "ITERS", "M", "N", "stride_xm", "stride_yk"))
print("{}")
"""


@pytest.fixture(scope="module")
def loops():
    pytest.importorskip("triton.backends.nvidia")
    return run_probe(PROBE, BENCH)


def test_grouped_merge_moves_w_as_16_byte_vectors(loops):
    """The grouped kernel reads W's address from a table; without the declared alignment it
    loaded and stored one bf16 at a time (the whole-model boundary ran at half the rate)."""
    ops = loops["grouped"]["ops"]
    assert not [op for op in ops if op.startswith(("LDG.E.U16", "STG.E.U16"))], ops
    assert ops.get("STG.E.128", 0) > 0 and ops.get("LDGSTS.E.BYPASS.128", 0) > 0, ops


@pytest.mark.parametrize("kernel", ["merge", "noise", "sr", "grouped"])
def test_tile_order_needs_no_layout_conversion(loops, kernel):
    """In tile order the product, the noise words and the store share one register layout:
    nothing is written to shared memory inside the loop (the W tile arrives by cp.async)
    and the only barriers are the pipeline's two. In natural order the noise and the
    rounded tile each went through shared memory: 10 barriers per tile, 64 -> 79 % of copy
    bandwidth for merge + noise at 8192^2 on the H200 when removed."""
    ops = loops[kernel]["ops"]
    assert not [op for op in ops if op.startswith(("STS", "STSM"))], ops
    assert ops.get("BAR.SYNC.DEFER_BLOCKING", 0) <= 2, ops


@pytest.mark.parametrize("kernel, budget", [("noise", 18), ("sr", 27), ("grouped", 19.5)])
def test_merge_noise_loop_instruction_budget(loops, kernel, budget):
    """Instructions per element of the loop (merge + noise 16.3 on Triton 3.6, 17.1 on 3.7.1;
    stochastic rounding 24.7 / 26.0; the H200 issued merge + noise at ~2/3 of its peak rate,
    so each one costs); no per-element NaN guard from tl.dot's tf32x3 (stochastic rounding
    keeps its own, on the value it rounds)."""
    loop = loops[kernel]
    assert loop["per_element"] < budget, loop["per_element"]
    if kernel != "sr":
        assert loop["ops"].get("FSETP.NAN.AND", 0) == 0, loop["ops"]


@pytest.mark.parametrize("kernel", ["noise", "sr", "grouped"])
def test_noise_field_is_one_funnel_shift_per_element(loops, kernel):
    """The noise field becomes a float's bits with one ``SHF.R.W`` per element (32 per thread
    and tile), not a shift, a mask and an or (``common.centred_from_words``)."""
    assert loops[kernel]["ops"].get("SHF.R.W.U32", 0) >= 32, loops[kernel]["ops"]


def test_merge_compiles_with_integer_arguments_equal_to_one():
    """Triton passes an integer argument equal to 1 as a compile-time constant: a walk of one
    row program (``ROW_PROGRAMS == 1``) once failed to compile on the GPU only."""
    pytest.importorskip("triton.backends.nvidia")
    run_probe(ONES, BENCH)
