"""Smoke test of benchmarks/host_overhead.py: one tiny shape (D = 16), one call per round, in a subprocess (the
kernels compile for sm_90 without the interpreter). ~10 s with Triton's cache warm, ~40 s on two cores when it
compiles. Checks the table's fields and that the launches counted are the ones the launchers issue."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "benchmarks", "host_overhead.py")
pytest.importorskip("triton")


def test_host_overhead_tiny(tmp_path):
    out = tmp_path / "host.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT, "--tiny", "--repeat", "1", "--number", "1", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    for field in ("CPU:", "torch ", "triton ", "commit ", "| case | path | host us | wall us | x yardstick |"):
        assert field in text, field
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    table = [dict(zip(header, r)) for r in rows]
    assert table[0]["case"].startswith("yardstick") and float(table[0]["x yardstick"]) == 1.0
    paths = {r["path"] for r in table[1:]}
    assert paths <= {"jit", "fast"} and "jit" in paths
    for r in table[1:]:
        assert float(r["host us"]) > 0 and float(r["x yardstick"]) > 0
        if r["case"].startswith("train"):  # fwd, delta, dK/dV, one prefix piece (P = 16), reduction, dQ
            assert int(r["launches"]) == 6, r
        else:  # the decode path: one or two launches (split-KV and its combine; or prefix and text parts)
            assert 1 <= int(r["launches"]) <= 2, r
        assert int(r["aten ops"]) > 0
