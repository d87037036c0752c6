"""Every Triton kernel variant the public ops reach compiles for sm_90, with the GPU machine's Triton, without a
``poison`` operand in any memory instruction of its LLVM IR (benchmarks/poison_scan.py).

A poisoned address is a crash on the GPU that the interpreter cannot show: the first GPU run died this way in
every 16-bit non-causal backward. The scan runs in a process of its own, with the Triton of ``make setup``'s side
install (``.triton36``, the version on the GPU machine) ahead of the venv's on ``sys.path``; a control kernel with
the crash's pattern proves the scan finds what it looks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GPU_TRITON_DIR = os.path.join(ROOT, os.environ.get("PREFIX_ATTN_GPU_TRITON_DIR", ".triton36"))
GPU_TRITON_VERSION = "3.6.0"


def _scan(tmp_path, *args):
    assert os.path.isdir(os.path.join(GPU_TRITON_DIR, "triton")), (
        f"no Triton side install at {GPU_TRITON_DIR}: `make setup` puts triton=={GPU_TRITON_VERSION} there")
    out = tmp_path / "scan.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([GPU_TRITON_DIR, ROOT]))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "poison_scan.py"), "--json", str(out),
                          *args], capture_output=True, text=True, timeout=1500, env=env)
    report = json.loads(out.read_text()) if out.exists() else None
    return run, report


def test_no_poisoned_memory_operand_in_any_kernel_variant(tmp_path):
    run, report = _scan(tmp_path)
    log = run.stdout[-6000:] + run.stderr[-6000:]
    assert report is not None, log
    assert report["triton"] == GPU_TRITON_VERSION, report["triton"]
    assert report["control"] > 0, "the scan missed the control kernel's poisoned copies"
    # fwd, preprocess, dK/dV, dprefix, reduction and dQ in several switch sets, and the decode path's kernels
    assert report["kernels"] >= 60 and report["calls"] >= 100, report
    assert report["poisoned"] == [], log
    assert run.returncode == 0, log
