"""pytest hooks: a CUDA kernel fault ends the test process that hit it."""

import os

# A kernel fault (illegal address, launch failure) poisons the process's CUDA context: every later test of that
# process would fail with the same error at its first CUDA call. The faulting test ends the process: under
# pytest-xdist the worker is replaced (the test is reported as crashed, the others run on a fresh worker),
# without it the run stops with the test named.
_CUDA_FAULTS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                "device-side assert", "illegal instruction")


def cuda_fault(text: str) -> bool:
    return any(f in text for f in _CUDA_FAULTS)


_faults = {}  # nodeid -> the first line of its CUDA error


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and cuda_fault(str(call.excinfo.value)):
        _faults[item.nodeid] = f"{item.nodeid}: {str(call.excinfo.value).strip().splitlines()[0]}"


def pytest_runtest_logfinish(nodeid, location):
    fault = _faults.pop(nodeid, None)
    if fault is None:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        print(f"\nCUDA context lost in {fault}; this worker exits and a fresh one takes the remaining tests",
              flush=True)
        os._exit(3)
    import pytest

    pytest.exit(f"CUDA context lost in {fault}; the tests after it cannot run in this process", returncode=1)
