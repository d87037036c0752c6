"""Native CPU kernel vs expand + concat + ``F.scaled_dot_product_attention``: forward + backward, float32.

    python benchmarks/bench_cpu.py                 # the table of docs/cpu.md, results in benchmarks/results/
    python benchmarks/bench_cpu.py --quick         # fewer repetitions
    python benchmarks/bench_cpu.py --dtype bfloat16   # both in bfloat16 (no memory columns; bench_cpu_bfloat16.*)

Baseline ("sdpa"): the prefix is expanded over the batch and concatenated with the text K/V, then
``F.scaled_dot_product_attention(q, K, V, attn_mask=causal_lower_right(T, P + T))`` (PyTorch's fused CPU
attention with the bottom-right causal mask materialised), backward through autograd.
Ours ("cpu"): ``prefix_attention(q, k, v, prefix_k, prefix_v, backend="cpu")``, backward through its fused
C++ backward. Both get the same leaves with ``requires_grad`` and the same ``dout``.

Method:
  * correctness first: outputs and all five gradients of both are compared with the float64 reference
    (max error relative to max |reference| below 1e-4) before anything is timed;
  * time: one forward + backward per sample, ``time.perf_counter``; the two variants are measured side by
    side, alternating which goes first, in every round; the table reports the median of each and the
    median of the per-round ratios (sdpa / cpu): robust to the machine being busy in some rounds;
  * FLOPs by flash-attention's convention (fwd = 4 B H T D (P + T/2), bwd = 2.5 fwd), for GFLOP/s, next to
    the machine's own ``torch.mm`` rate (512 x 512 float32, the same thread count, median of 15, measured in the
    same run before each shape; the best of those samples is the rate): "% mm" is the kernel's GFLOP/s over
    it; "cpu fwd ms" is our forward alone (the rest of "cpu ms" is the backward);
  * peak memory: each variant runs once in a fresh subprocess; after building its inputs and a warm-up
    on a tiny shape, the process resets its resident-set high-water mark (``/proc/self/clear_refs``,
    falling back to ``ru_maxrss``), runs one forward + backward, and reports high-water mark minus the RSS
    before the call: the memory the op itself needed on top of its inputs (saved tensors, outputs,
    gradients, scratch). tracemalloc and ``torch.cuda`` statistics do not see ATen's CPU allocations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import cpu_model, git_commit, make_inputs, round_ratios, side_by_side, write_json  # noqa: E402

from prefix_attn import prefix_attention, prefix_attention_reference  # noqa: E402
from prefix_attn.demo import expand_concat_sdpa  # noqa: E402
from prefix_attn.reference import attention_flops  # noqa: E402

CONFIGS = [  # (batch, heads, len, head_dim, num_prefix)
    (4, 12, 512, 64, 10),
    (4, 12, 512, 64, 200),
    (1, 32, 1024, 128, 32),
]


DTYPE = torch.float32  # --dtype


def make(cfg, seed=0):
    """([q, k, v, prefix_k, prefix_v], dout) in DTYPE, not requiring grad."""
    B, H, T, D, P = cfg
    return make_inputs(B, H, H, T, T, P, D, dtype=DTYPE, seed=seed, requires_grad=False)


def mm_rate(n: int = 512, repeats: int = 15) -> float:
    """GFLOP/s of ``torch.mm`` on n x n float32 matrices: the machine's own matmul rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def forward_ms(cfg, repeats: int = 5) -> float:
    """Median ms of our forward alone (no autograd graph)."""
    leaves, _ = make(cfg)
    run_cpu(*leaves)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_cpu(*leaves)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_cpu(q, k, v, pk, pv):
    return prefix_attention(q, k, v, pk, pv, causal=True, backend="cpu")


run_sdpa = expand_concat_sdpa  # expand + concat + SDPA(attn_mask=causal_lower_right(T, P + T))

VARIANTS = {"cpu": run_cpu, "sdpa": run_sdpa}


def fwd_bwd(fn, leaves, dout):
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    out.backward(dout)
    return out


def check(cfg) -> dict:
    leaves, dout = make(cfg)
    ref_leaves = [t.double().requires_grad_() for t in leaves]
    ref = prefix_attention_reference(*ref_leaves, causal=True)
    ref.backward(dout.double())
    want = [ref.detach()] + [t.grad for t in ref_leaves]
    errs = {}
    for name, fn in VARIANTS.items():
        lv = [t.clone().requires_grad_() for t in leaves]
        out = fwd_bwd(fn, lv, dout)
        got = [out.detach()] + [t.grad for t in lv]
        err = max(((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
                  for g, w in zip(got, want))
        errs[name] = err
        if not err < (1e-4 if DTYPE == torch.float32 else 3e-2):
            raise SystemExit(f"{cfg}: {name} disagrees with the float64 reference (relative error {err:.2e})")
    return errs


def time_pair(cfg, rounds: int, warmup: int = 2) -> dict:
    leaves, dout = make(cfg)
    lv = {name: [t.clone().requires_grad_() for t in leaves] for name in VARIANTS}
    times = side_by_side(lambda name: (lambda: fwd_bwd(VARIANTS[name], lv[name], dout)), VARIANTS, rounds, warmup)
    ratios = round_ratios(times, "sdpa", "cpu")
    return {"median_s": {n: statistics.median(ts) for n, ts in times.items()},
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds}


_MEM_CHILD = r"""
import os, resource, sys, json, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import torch
sys.path.insert(0, {bench!r})
import bench_cpu as bc
torch.set_num_threads({threads})
cfg, name = {cfg!r}, {name!r}
tiny = (1, 2, 8, 8, 2)
l, d = bc.make(tiny); bc.fwd_bwd(bc.VARIANTS[name], [t.requires_grad_() for t in l], d)
leaves, dout = bc.make(cfg)
leaves = [t.requires_grad_() for t in leaves]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    method = "VmHWM after clear_refs"
except OSError:
    method = "ru_maxrss"
before = rss()
bc.fwd_bwd(bc.VARIANTS[name], leaves, dout)
peak = hwm() if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak_bytes": peak - before, "method": method}}))
"""


def peak_memory(cfg, name: str, threads: int) -> dict:
    code = _MEM_CHILD.format(root=ROOT, bench=os.path.dirname(os.path.abspath(__file__)), cfg=cfg, name=name,
                             threads=threads)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 rounds, no memory measurement")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    low = DTYPE != torch.float32  # memory is measured for float32 only
    warnings.simplefilter("ignore")
    from prefix_attn import cpu as cpu_backend

    ok, reason = cpu_backend.is_available()
    if not ok:
        raise SystemExit(f"native CPU kernel unavailable: {reason}")
    rounds = 5 if args.quick else args.rounds
    threads = torch.get_num_threads()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "kernel": cpu_backend.source(),
            "gemm": cpu_backend._load()[0].gemm_backend(),
            "tile_products": cpu_backend._load()[0].tile_products(args.dtype) if low else "float32",
            "dtype": args.dtype, "pass": "forward + backward",
            "load_average_at_start": os.getloadavg(), "command": "python " + " ".join(sys.argv),
            "git_commit": git_commit(),
            "mm_gflops_samples": [mm_rate()]}
    meta["mm_gflops"] = meta["mm_gflops_samples"][0]
    print(f"{meta['cpu']}, {threads} threads, torch {meta['torch']}, {args.dtype} forward + backward, "
          f"{rounds} rounds side by side; torch.mm 512x512 float32: {meta['mm_gflops']:.1f} GFLOP/s")
    header = (f"{'B':>2} {'H':>3} {'T':>5} {'D':>4} {'P':>4} | {'sdpa ms':>8} {'cpu ms':>8} {'ratio':>6} "
              f"{'cpu GFLOP/s':>11} {'% mm':>5} {'cpu fwd ms':>10} | {'sdpa peak MiB':>13} {'cpu peak MiB':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for i, cfg in enumerate(CONFIGS):
        if i:  # the machine's rate: the best of the samples taken between shapes (a busy moment only lowers one)
            meta["mm_gflops_samples"].append(mm_rate())
            meta["mm_gflops"] = max(meta["mm_gflops_samples"])
        errs = check(cfg)
        timing = time_pair(cfg, rounds)
        mem = ({} if args.quick or low else {name: peak_memory(cfg, name, threads) for name in VARIANTS})
        fwd, bwd = attention_flops(cfg[0], cfg[1], cfg[2], cfg[2], cfg[4], cfg[3])
        row = {"batch": cfg[0], "heads": cfg[1], "len": cfg[2], "head_dim": cfg[3], "num_prefix": cfg[4],
               "max_rel_error_vs_float64": errs, **timing,
               "cpu_gflops": (fwd + bwd) / timing["median_s"]["cpu"] / 1e9, "cpu_fwd_ms": forward_ms(cfg),
               "peak_bytes": {n: m["peak_bytes"] for n, m in mem.items()},
               "memory_method": next(iter(mem.values()))["method"] if mem else None}
        rows.append(row)
        mib = {n: f"{row['peak_bytes'][n] / 2**20:.1f}" if n in row["peak_bytes"] else "-" for n in VARIANTS}
        print(f"{cfg[0]:>2} {cfg[1]:>3} {cfg[2]:>5} {cfg[3]:>4} {cfg[4]:>4} | "
              f"{timing['median_s']['sdpa'] * 1e3:8.1f} {timing['median_s']['cpu'] * 1e3:8.1f} "
              f"{timing['ratio_median']:5.2f}x {row['cpu_gflops']:11.1f} "
              f"{100 * row['cpu_gflops'] / meta['mm_gflops']:4.0f}% {row['cpu_fwd_ms']:10.1f} | "
              f"{mib['sdpa']:>13} {mib['cpu']:>12}",
              flush=True)
    samples = ", ".join(f"{x:.1f}" for x in meta["mm_gflops_samples"])
    print(f"torch.mm samples {samples} GFLOP/s: rate {meta['mm_gflops']:.1f}; % mm of the rows: "
          + ", ".join(f"{100 * r['cpu_gflops'] / meta['mm_gflops']:.0f}%" for r in rows))
    if args.quick:
        return
    os.makedirs(args.out, exist_ok=True)
    stem = "bench_cpu" if not low else f"bench_cpu_{args.dtype}"
    write_json(os.path.join(args.out, f"{stem}.json"), {"meta": meta, "rows": rows}, indent=2)
    memory = (f"peak = resident-memory high-water mark above the inputs ({rows[0]['memory_method']}); " if not low
              else "")
    lines = [f"# CPU kernel vs expand + concat + SDPA (`{meta['command']}`)", "",
             f"{meta['date']}, commit {meta['git_commit']}, {meta['cpu']} ({meta['cores']} cores), {threads} threads, "
             f"torch {meta['torch']}, {args.dtype} forward + backward, median of {rounds} side-by-side rounds; "
             f"ratio = median of per-round sdpa / cpu; {memory}load average at start "
             f"{meta['load_average_at_start'][0]:.2f}; torch.mm 512 x 512 float32 in the same run: "
             f"{meta['mm_gflops']:.1f} GFLOP/s (% mm = cpu GFLOP/s over it).", ""]
    mem_head, mem_rule = (" sdpa peak MiB | cpu peak MiB |", "---|---|") if not low else ("", "")
    lines += ["| B | H | T | D | P | sdpa ms | cpu ms | ratio | cpu GFLOP/s | % mm | cpu fwd ms |" + mem_head,
              "|---|---|---|---|---|---|---|---|---|---|---|" + mem_rule]
    for r in rows:
        mem_cells = (f" {r['peak_bytes']['sdpa'] / 2**20:.1f} | {r['peak_bytes']['cpu'] / 2**20:.1f} |" if not low
                     else "")
        lines.append(f"| {r['batch']} | {r['heads']} | {r['len']} | {r['head_dim']} | {r['num_prefix']} | "
                     f"{r['median_s']['sdpa'] * 1e3:.1f} | {r['median_s']['cpu'] * 1e3:.1f} | "
                     f"{r['ratio_median']:.2f}x | {r['cpu_gflops']:.1f} | "
                     f"{100 * r['cpu_gflops'] / meta['mm_gflops']:.0f}% | {r['cpu_fwd_ms']:.1f} |" + mem_cells)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/{stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
