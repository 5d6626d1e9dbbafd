"""Shared test set-up. Without a GPU, Triton kernels run on the CPU through the
interpreter: TRITON_INTERPRET must be set before triton is first imported."""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


@pytest.fixture
def poison():
    """Every tensor allocated uninitialised (torch.empty, at::empty in C++) is NaN-filled
    (ints: max value) while the test runs, so an output element a kernel forgets to write
    shows up as NaN instead of passing by luck."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all(), "poisoning of uninitialised memory is off"
    yield
    torch.use_deterministic_algorithms(prev)
