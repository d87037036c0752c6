"""The GPU check without a GPU: its stages fit their device calls, the triage names the first wrong output, the
decode benchmark runs (eagerly) on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
CALL_LIMIT = 600  # one device call, at most
STEP = re.compile(r"^stage (\d)\s+(\S+)\s+timeout\s+(\d+)s\s+(.*)$")


def _dry_run(stage: int):
    run = subprocess.run(["bash", SCRIPT, "--stage", str(stage), "--dry-run"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    steps = [STEP.match(line).groups() for line in run.stdout.splitlines() if STEP.match(line)]
    return run, [(name, int(limit), command) for _, name, limit, command in steps]


def test_stage1_steps_and_timeouts_fit_one_call():
    run, steps = _dry_run(1)
    assert run.returncode == 0, run.stdout + run.stderr
    names = [name for name, _, _ in steps]
    assert names == ["env", "gpu_tests", "decode", "attention"]
    total = sum(limit for _, limit, _ in steps)
    assert total <= 300, f"stage 1 timeouts sum to {total}s, over ~5 minutes of command"
    assert f"step timeouts sum to {total}s" in run.stdout
    commands = " ".join(command for _, _, command in steps)
    for needed in ("bench_decode.py", "bench_attention.py", "--do gpu_tests", "sdpa[auto]", "flex", "peft_eager"):
        assert needed in commands
    assert "pip install" not in commands and "setup.py" not in commands  # no C++ build on the GPU machine
    for script in re.findall(r"benchmarks/\S+\.py", commands):
        assert os.path.exists(os.path.join(ROOT, script)), script


def test_stage2_both_branches_fit_one_call():
    run, steps = _dry_run(2)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    fail_part = out[out.index("tests failed:"):out.index("all passed:")]
    pass_part = out[out.index("all passed:"):]
    fail_total = sum(int(m.group(3)) for m in map(STEP.match, fail_part.splitlines()) if m)
    pass_total = sum(int(m.group(3)) for m in map(STEP.match, pass_part.splitlines()) if m)
    rerun = next(limit for name, limit, _ in steps if name == "gpu_tests")
    assert {"triage", "sanitizer"} <= {n for n, _, _ in steps} and {"autotune", "suite"} <= {n for n, _, _ in steps}
    assert fail_total <= 300 and pass_total <= 300, (fail_total, pass_total)
    assert rerun + max(fail_total, pass_total) <= CALL_LIMIT - 60  # a fresh machine: the tests run again first
    assert f"failed branch {fail_total}s, passed branch {pass_total}s" in out


def test_dry_run_rejects_bad_arguments():
    run = subprocess.run(["bash", SCRIPT, "--stage", "3", "--dry-run"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage" in run.stderr


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a GPU")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.5


@needs_triton
def test_triage_names_the_first_wrong_output(monkeypatch, tmp_path):
    triage = _load("gpu_triage")
    import prefix_attn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case_id = "B2-Hq2-Hkv2-Tq17-Tk17-P1-D32-causal-mask-float32"
    case, dtype, seed = triage.known_cases()[case_id]
    good = triage.run_variant(case, dtype, seed, "small", device)
    assert good["first_wrong"] is None, good
    real = prefix_attn.prefix_attention
    monkeypatch.setattr(prefix_attn, "prefix_attention",
                        lambda q, k, v, pk, pv, **kw: real(q, _ScaleGrad.apply(k), v, pk, pv, **kw))
    bad = triage.run_variant(case, dtype, seed, "table", device)
    assert bad["first_wrong"] == "dk", bad  # out and dq are right; dk is the first wrong one
    assert bad["outputs"]["out"] is None and bad["outputs"]["dq"] is None and bad["outputs"]["dv"] is None


def test_triage_reads_junit_failures(tmp_path):
    triage = _load("gpu_triage")
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_triton" name="test_grid[B2-Hq2-Hkv2-Tq17-Tk17-P1-D32-causal-mask-float16]">'
        '<failure message="AssertionError: dq">x</failure></testcase>'
        '<testcase classname="tests.test_triton" name="test_gpu_real_sizes[B2-Hq8-Hkv4-Tq1-Tk1000-P200-D128-causal-'
        'bfloat16]"><failure message="AssertionError: out">x</failure></testcase>'
        '<testcase classname="tests.test_triton" name="test_gpu_auto_backend_is_triton"><error message="boom"/>'
        '</testcase><testcase classname="tests.test_triton" name="test_grid[B1-Hq4-Hkv1-Tq1-Tk1-P3-D16-causal-'
        'float32]"/></testsuite></testsuites>')
    failed = triage.failures(str(xml))
    assert [pid for _, pid, _ in failed] == ["B2-Hq2-Hkv2-Tq17-Tk17-P1-D32-causal-mask-float16",
                                             "B2-Hq8-Hkv4-Tq1-Tk1000-P200-D128-causal-bfloat16", None]
    known = triage.known_cases()
    assert known["B2-Hq8-Hkv4-Tq1-Tk1000-P200-D128-causal-bfloat16"][2] == 1  # the real-size tests' seed
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_triage.py"), "--junit", str(xml),
                          "--smallest"], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "B2-Hq2-Hkv2-Tq17-Tk17-P1-D32-causal-mask-float16", run.stderr


def test_decode_benchmark_runs_on_the_cpu(tmp_path):
    decode = _load("bench_decode")
    results = decode.main(["--device", "cpu", "--shapes", "tiny", "--len-q", "1,3", "--dtype", "float32",
                           "--out", str(tmp_path)])
    rows = results["rows"]
    assert {(r["len_q"], r["method"]) for r in rows} == {(q, m) for q in (1, 3) for m in ("prefix_attn", "sdpa[auto]")}
    assert all(r["status"] == "ok" and r["eager_us"] > 0 and r["graph_us"] is None for r in rows), rows
    assert all(r["max_rel_err"] < 1e-5 for r in rows)
    written = json.loads(next(tmp_path.glob("decode_*.json")).read_text())
    assert len(written["rows"]) == 4 and written["meta"]["git_commit"]
    assert "| tiny | 3 | 64 | prefix_attn |" in next(tmp_path.glob("decode_*.md")).read_text()


FAULTY = '''
def test_a_fault():
    raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

def test_b_after():
    print("RAN AFTER THE FAULT")
'''


@pytest.mark.parametrize("xdist_worker", [False, True])
def test_a_cuda_fault_ends_its_process(tmp_path, xdist_worker):
    """After an illegal address the CUDA context is lost: the faulting test ends the process (a worker of
    pytest-xdist is replaced; alone, the run stops naming it) instead of failing every later test."""
    (tmp_path / "conftest.py").write_text("from cuda_faults import pytest_runtest_logfinish, "
                                          "pytest_runtest_makereport  # noqa\n")
    (tmp_path / "test_faulty.py").write_text(FAULTY)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    env.pop("PYTEST_XDIST_WORKER", None)
    if xdist_worker:
        env["PYTEST_XDIST_WORKER"] = "gw0"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert "RAN AFTER THE FAULT" not in out, out
    assert "CUDA context lost in test_faulty.py::test_a_fault" in out, out
    assert run.returncode == (3 if xdist_worker else 1), out
