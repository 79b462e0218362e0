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

print(json.dumps(dict(
    merge=loop(sm.compile_merge(16, 64, 128, 4, 3, noise=True, stochastic=False), 64),
    grouped=loop(sm.compile_group_merge(16, 64, 128, 4, 3, noise=True), 64))))
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


@pytest.mark.parametrize("kernel", ["merge", "grouped"])
def test_merge_noise_loop_instruction_budget(loops, kernel):
    """Merge + noise at 64 x 128 tiles: ~21 instructions per element (the copy floor of the
    H200 allows ~31 at full issue); no per-element NaN guard from tl.dot's tf32x3."""
    loop = loops[kernel]
    assert loop["per_element"] < 26, loop["per_element"]
    assert loop["ops"].get("FSETP.NAN.AND", 0) == 0, loop["ops"]
