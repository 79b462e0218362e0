"""Test-wide settings: few CPU threads (the CI machine is small and shared), Triton's
interpreter for the kernels on the CPU, offline Hugging Face hub."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("LORASC_TEST_GPU") != "1":
    # must be set before any @triton.jit decorates a kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A fresh, differently seeded generator per test (inputs are random on every run)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input generator seed: {seed}")  # shown with a failing test's output
    return torch.Generator().manual_seed(seed)
