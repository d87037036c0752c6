"""Triage of failing GPU tests: rerun each failing grid case with other tiles and name the first wrong output.

    python benchmarks/gpu_triage.py --junit gpu_tests.xml --out DIR [--max-cases 4] [--time-budget 120]
    python benchmarks/gpu_triage.py --junit gpu_tests.xml --smallest          # print the smallest failing case id
    python benchmarks/gpu_triage.py --case ID [--variant table]              # one run (under compute-sanitizer)

A failing test of a correctness grid (tests/prefix_grid.py: ``GPU_GRID``, ``GRID``, ``SOFTCAP_GRID``,
``BANK_GRID``, ``DROPOUT_GRID``) is rerun with each tile variant below, and the first output of out, dq, dk, dv,
dprefix_k, dprefix_v outside the tests' 2x/3x bound is named: a failure that goes away with one stage or four warps
points at the software pipeline or the warpgroup split, one that stays everywhere at the kernel's math.

    table     the tile table as the tests ran it
    stages1   num_stages = 1 (no software pipelining)
    warps4    num_warps = 4 (one warpgroup)
    small     32 x 32 tiles (16 x 16 for float32), 4 warps, 1 stage

Results: ``<out>/triage.json`` and ``triage.md``, rewritten after every case. Tests that are not grid cases are
listed with their message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

import prefix_grid as grid  # noqa: E402

VARIANTS = {
    "table": lambda kernel, cfg: cfg,
    "stages1": lambda kernel, cfg: cfg._replace(num_stages=1),
    "warps4": lambda kernel, cfg: cfg._replace(num_warps=4),
    "small": None,  # depends on the dtype: see _small
}


def _small(dtype):
    m = 16 if dtype == torch.float32 else 32
    return lambda kernel, cfg: type(cfg)(m, m, 4, 1)


def known_cases() -> dict:
    """{test id: (case, dtype, seed)} for every case of the grids, seeded as its test seeds it."""
    cases = {}
    for group in (grid.GRID, grid.SOFTCAP_GRID, grid.BANK_GRID, grid.DROPOUT_GRID):
        for case in group:
            for dtype in grid.DTYPES:
                cases[f"{case}-{grid.dtype_id(dtype)}"] = (case, dtype, zlib.crc32(str(case).encode()) % 1000)
    for case in grid.GPU_GRID:  # test_gpu_real_sizes uses seed 1
        for dtype in grid.DTYPES:
            cases[f"{case}-{grid.dtype_id(dtype)}"] = (case, dtype, 1)
    return cases


def failures(junit: str) -> list:
    """[(test name, param id or None, message)] of the failed and errored tests of a junit XML file."""
    out = []
    for tc in ET.parse(junit).getroot().iter("testcase"):
        bad = tc.find("failure")
        if bad is None:
            bad = tc.find("error")
        if bad is None:
            continue
        name = tc.get("name", "")
        param = name[name.index("[") + 1:-1] if "[" in name and name.endswith("]") else None
        message = " ".join((bad.get("message") or bad.text or "").split())[:400]
        out.append((f"{tc.get('classname', '')}::{name}", param, message))
    return out


def size(case) -> int:
    return case.batch * case.heads_q * (case.len_q + case.len_k + case.num_prefix) * case.head_dim


def run_variant(case, dtype, seed: int, variant: str, device: str = "cuda") -> dict:
    """{"first_wrong": name or None, "outputs": {name: problem}, "s": seconds} of one rerun."""
    import prefix_attn  # noqa: PLC0415
    from prefix_attn.triton import tuning  # noqa: PLC0415

    def op(*args, **kwargs):
        return prefix_attn.prefix_attention(*args, backend="triton", **kwargs)

    tuning.override(VARIANTS[variant] or _small(dtype))
    t0 = time.time()
    try:
        rows = grid.case_errors(op, case, dtype, device=device, seed=seed)
    except Exception as exc:  # noqa: BLE001 - a crash is a result too
        return {"first_wrong": "crash", "outputs": {"crash": f"{type(exc).__name__}: {str(exc)[:300]}"},
                "kernel": faulting_launch(exc), "s": round(time.time() - t0, 2)}
    finally:
        tuning.override(None)
    problems = {name: problem for name, problem, _, _ in rows}
    first = next((name for name, problem, _, _ in rows if problem), None)
    return {"first_wrong": first, "outputs": problems, "s": round(time.time() - t0, 2)}


def faulting_launch(exc: BaseException) -> str:
    """The last kernel launch of prefix_attn/triton/launch.py in the traceback (with CUDA_LAUNCH_BLOCKING=1,
    the kernel that faulted), e.g. "_prefix_attn_bwd_dkdv_kernel (launch.py:298)"; "" if none."""
    import re  # noqa: PLC0415
    import traceback  # noqa: PLC0415

    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.endswith(os.path.join("triton", "launch.py")):
            name = re.search(r"(_prefix_attn_\w+_kernel)", frame.line or "")
            found = f"{name.group(1) if name else frame.name} (launch.py:{frame.lineno})"
    return found


def run_isolated(pid: str, variant: str, timeout: float) -> dict:
    """run_variant in a fresh process with CUDA_LAUNCH_BLOCKING=1: a fault loses that process's CUDA context
    only, and the traceback names the kernel that faulted."""
    import subprocess  # noqa: PLC0415

    t0 = time.time()
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    try:
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", pid, "--variant", variant],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"first_wrong": "timeout", "outputs": {}, "s": round(time.time() - t0, 2)}
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"first_wrong": "crash", "outputs": {"crash": (run.stdout + run.stderr)[-600:]},
            "s": round(time.time() - t0, 2)}


def markdown(report: dict) -> str:
    lines = [f"# GPU triage, {report['device']}", "", f"torch {report['torch']}, triton {report['triton']}", "",
             "| case | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for case_id, result in report["cases"].items():
        cells = [(result.get(v, {}).get("first_wrong") or ("ok" if v in result else "-"))
                 + (f" in {result[v]['kernel']}" if result.get(v, {}).get("kernel") else "") for v in VARIANTS]
        lines.append(f"| {case_id} | " + " | ".join(cells) + " |")
    lines += ["", "First wrong output per variant (ok: all six within bound; -: not run)."]
    if report["other"]:
        lines += ["", "Failures that are not grid cases:", ""]
        lines += [f"- `{name}`: {message}" for name, message in report["other"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", help="junit XML of the GPU tests")
    p.add_argument("--out", default=".")
    p.add_argument("--max-cases", type=int, default=4)
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds; no new case starts after")
    p.add_argument("--smallest", action="store_true", help="print the id of the smallest failing grid case")
    p.add_argument("--case", help="run one grid case id (with --variant) and exit 1 if an output is wrong")
    p.add_argument("--variant", default="table", choices=sorted(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu runs the kernels under TRITON_INTERPRET=1 (tests of this script)")
    args = p.parse_args(argv)
    cases = known_cases()
    if args.case:
        case, dtype, seed = cases[args.case]
        result = run_variant(case, dtype, seed, args.variant, args.device)
        print(json.dumps(result))
        return 1 if result["first_wrong"] else 0
    failed = failures(args.junit)
    in_grid = [(pid, cases[pid]) for _, pid, _ in failed if pid in cases]
    in_grid.sort(key=lambda item: size(item[1][0]))
    if args.smallest:
        print(in_grid[0][0] if in_grid else "")
        return 0
    import triton  # noqa: PLC0415

    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "failed_tests": len(failed), "cases": {},
              "other": [(name, msg) for name, pid, msg in failed if pid not in cases]}
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    seen = set()
    for pid, (case, dtype, seed) in in_grid:
        if pid in seen or len(seen) >= args.max_cases:
            continue
        seen.add(pid)
        report["cases"][pid] = {}
        for variant in VARIANTS:
            if time.time() - t0 > args.time_budget:
                break
            if args.device == "cuda":  # each rerun in its own process: a fault must not poison the next
                result = run_isolated(pid, variant, max(10.0, args.time_budget - (time.time() - t0)))
            else:
                result = run_variant(case, dtype, seed, variant, args.device)
            report["cases"][pid][variant] = result
            print(f"{pid} {variant}: first wrong {result['first_wrong']} ({result['s']} s)", flush=True)
            with open(os.path.join(args.out, "triage.json"), "w") as f:
                json.dump(report, f, indent=1)
            with open(os.path.join(args.out, "triage.md"), "w") as f:
                f.write(markdown(report))
    with open(os.path.join(args.out, "triage.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "triage.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
