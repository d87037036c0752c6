"""Without a CUDA GPU, Triton kernels run under the CPU interpreter (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# a CUDA fault ends the process that hit it (tests/cuda_faults.py)
from cuda_faults import pytest_runtest_logfinish, pytest_runtest_makereport  # noqa: E402,F401
