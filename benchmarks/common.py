"""What the benchmark scripts share: inputs, error measures, timers, peak memory and result files.

* inputs and correctness: ``make_inputs`` (q, k, v, prefix_k, prefix_v and dout from one seeded generator),
  ``forward_backward``, ``max_rel_error``;
* timing: ``timer`` (median ms: ``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU),
  ``time_mode`` (fwd / bwd / fwd+bwd of one attention function, with its peak memory), ``wall_times``
  (synchronised wall time of repeated calls), ``side_by_side`` (several variants timed in the same rounds,
  order rotated) and ``round_ratios``, ``peak_memory_mib`` (CUDA), ``matmul_rate`` (dense matmul TFLOP/s);
* the TFLOP/s convention: FLOPs by flash-attention's convention (``prefix_attn.reference.attention_flops``)
  over the median time (``tflops``);
* result files: ``result_path``, ``write_json``, ``write_csv`` and what a result records about where it was
  measured (``device_name``, ``cpu_model``, ``triton_version``, ``git_commit``, ``now``).

Importing this module makes ``prefix_attn`` importable from a checkout that is not installed.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

try:
    import prefix_attn  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import prefix_attn  # noqa: F401


# ----------------------------------------------------------------------------------------- errors
def short(exc: BaseException, n: int = 300, more: str = " ...") -> str:
    """The message of exc on one line, cut to n characters (``more`` marks a cut)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + more


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------- inputs and correctness
def make_inputs(
    batch,
    heads_q,
    heads_kv,
    len_q,
    len_k,
    num_prefix,
    head_dim,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    requires_grad=True,
):
    """([q, k, v, prefix_k, prefix_v], dout): standard normal, drawn in float32 in that order on the CPU."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = rnd(batch, heads_q, len_q, head_dim)
    k = rnd(batch, heads_kv, len_k, head_dim)
    v = rnd(batch, heads_kv, len_k, head_dim)
    pk = rnd(heads_kv, num_prefix, head_dim)
    pv = rnd(heads_kv, num_prefix, head_dim)
    dout = rnd(batch, heads_q, len_q, head_dim)
    leaves = [t.requires_grad_(True) if requires_grad else t for t in (q, k, v, pk, pv)]
    return leaves, dout


def forward_backward(fn, leaves, dout):
    """(out, grads) with every leaf's gradient (None where the method gave none)."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def max_rel_error(got, want) -> float:
    """max |got - want| / max(1, max |want|), over the output and each gradient; inf on a missing one."""
    worst = 0.0
    for a, b in zip(got, want):
        if b is None or b.numel() == 0:
            continue
        if a is None:
            return float("inf")
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, (a - b).abs().max().item() / max(1.0, b.abs().max().item()))
    return worst


# ----------------------------------------------------------------------------------------- timing
def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def timer(fn: Callable[[], object], device: torch.device, grad_to_none, args) -> float:
    """Median milliseconds of fn(); args gives warmup_ms and rep_ms (CUDA) or cpu_min_run_time (seconds)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        try:
            return float(
                do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, return_mode="median")
            )
        except TypeError:  # older Triton: no return_mode
            return float(
                do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, quantiles=[0.5])[0]
            )
    import torch.utils.benchmark as tbench

    def run():
        for t in grad_to_none or ():
            t.grad = None
        fn()

    run()  # warm-up (and first-call compilation)
    t = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=args.cpu_min_run_time).median * 1e3


def peak_memory_mib(fn: Callable[[], object], device: torch.device, leaves) -> Optional[float]:
    """Peak allocated above what exists before the call (the inputs), during one call. CUDA only."""
    if device.type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    for t in leaves:
        t.grad = None
    return peak / 2**20


def time_mode(mode, fn, leaves, dout, device, args, grad=True) -> dict:
    """{"ms", "peak_mib"} of fn(*leaves) in one mode: "fwd" (inputs requiring grad, as in training), "bwd"
    (``out.backward(dout, retain_graph=True)`` on one saved forward) or "fwdbwd"; grad=False: forward under
    no_grad on detached inputs, whatever the mode."""
    if not grad:
        xs = [t.detach() for t in leaves]
        with torch.no_grad():
            ms = timer(lambda: fn(*xs), device, None, args)
            return {"ms": ms, "peak_mib": peak_memory_mib(lambda: fn(*xs), device, xs)}
    if mode == "fwd":
        ms = timer(lambda: fn(*leaves), device, None, args)
        return {"ms": ms, "peak_mib": peak_memory_mib(lambda: fn(*leaves), device, leaves)}
    if mode == "bwd":
        out = fn(*leaves)
        ms = timer(lambda: out.backward(dout, retain_graph=True), device, leaves, args)
        del out
    else:
        ms = timer(lambda: fn(*leaves).backward(dout), device, leaves, args)
    peak = peak_memory_mib(lambda: fn(*leaves).backward(dout), device, leaves)
    for t in leaves:
        t.grad = None
    return {"ms": ms, "peak_mib": peak}


def matmul_rate(dtype, device, args) -> dict:
    """Dense matmul TFLOP/s of this device in this dtype (the yardstick of the matmul-rate targets)."""
    n = 8192 if device.type == "cuda" else (512 if args.quick else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(lambda: torch.matmul(a, b), device, None, args)
    return {"n": n, "ms": ms, "tflops": tflops(2 * n**3, ms)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_times(fn: Callable[[], object], repeats: int, device) -> List[float]:
    """Seconds of each of ``repeats`` calls of fn(), the device synchronised before and after each."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def side_by_side(
    prepare: Callable[[str], Callable[[], object]], names: Iterable[str], rounds: int, warmup: int = 1
) -> Dict[str, List[float]]:
    """{name: seconds per round}: every variant timed once per round, so that a busy spell of the machine hits
    them all. ``prepare(name)`` returns the call to time (what it does itself is not timed). ``warmup`` untimed
    rounds in the given order first; then timed round i starts at variant (i + warmup) % len(names)."""
    names = list(names)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            prepare(name)()
    for i in range(rounds):
        k = (i + warmup) % len(names)
        for name in names[k:] + names[:k]:
            fn = prepare(name)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def fwd_bwd_side_by_side(variants: Dict[str, Callable], tensors, dout, device, rounds: int,
                         warmup: int = 1) -> Dict[str, List[float]]:
    """``side_by_side`` of forward + backward: each call gets fresh leaves (copies of ``tensors`` requiring grad,
    made outside the timing), ``variants[name](*leaves).backward(dout)`` and a device sync."""
    def prepare(name):
        leaves = [t.clone().requires_grad_() for t in tensors]

        def call():
            variants[name](*leaves).backward(dout)
            sync(device)
        return call

    return side_by_side(prepare, variants, rounds, warmup)


def round_ratios(times: Dict[str, List[float]], num: str, den: str) -> List[float]:
    """Per-round time ratios num / den from ``side_by_side``'s result."""
    return [a / b for a, b in zip(times[num], times[den])]


# ----------------------------------------------------------------------------------------- where it ran
def cpu_arch() -> str:
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu_arch()


def device_name(device: torch.device, cpu: Optional[str] = None) -> str:
    """The GPU's name, or "CPU <cpu> (<n> threads)" with cpu defaulting to ``cpu_arch()``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu or cpu_arch()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "not importable"


def git_commit() -> str:
    """Short hash of the checkout's HEAD, "-dirty" when tracked files are modified; outside git the value of
    PREFIX_ATTN_COMMIT (a copy of the tree on a GPU machine, benchmarks/gpu_check.sh), else "unknown"."""
    if os.environ.get("PREFIX_ATTN_COMMIT"):
        return os.environ["PREFIX_ATTN_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def now() -> str:
    """Local date and time with its UTC offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- result files
def result_path(out: str, kind: str, device: str) -> str:
    """``<out>/<kind>_<device name, 40 characters>_<YYYYmmdd-HHMMSS>.json``; creates out."""
    os.makedirs(out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")[:40]
    return os.path.join(out, f"{kind}_{slug}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")


def write_cpu_markdown(out: str, kind: str, text: str, suffix: str = "") -> str:
    """``<out>/<kind>_<the CPU's first three words, lower case, no "(r)">[suffix].md``, one file per CPU (a rerun
    replaces it); creates out, returns the path."""
    os.makedirs(out, exist_ok=True)
    cpu = "_".join(cpu_model().lower().split()[:3]).replace("(r)", "")
    path = os.path.join(out, f"{kind}_{cpu}{suffix}.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_json(path: str, obj, indent: int = 1) -> None:
    """Written whole or not at all (a temporary file renamed); what JSON cannot hold is written as str()."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=str)
    os.replace(tmp, path)


def write_csv(path: str, rows: List[dict], fields: List[str], comment: str = "") -> None:
    """One line per row with the given columns (other keys ignored), after a "# comment" line if given."""
    with open(path, "w", newline="") as f:
        if comment:
            f.write(f"# {comment}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
