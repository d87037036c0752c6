"""Prefix attention benchmark: ``prefix_attn`` against the ways people run prefix tuning today.

One command, on a GPU or on a CPU::

    python benchmarks/bench_attention.py                      # full set (GPU) / scaled-down set (CPU)
    python benchmarks/bench_attention.py --quick              # one shape, P=64 (GPU) / two scaled-down shapes (CPU)
    python benchmarks/bench_attention.py --shapes llama-7b --dtypes bfloat16 --modes fwdbwd --prefix 64

Methods, all measured in the same run on the same inputs, each checked for correctness before it is timed:

    prefix_attn        the fused op (Triton on CUDA; the native CPU kernel, else the reference, on CPU)
    peft_eager         baseline 1: PEFT's path through the stock eager attention: prefix expanded over the
                       batch, concatenated with the text K/V, repeat_kv for GQA, q @ k^T * scale + additive
                       0/finfo.min mask, softmax in float32 cast back, @ v
    sdpa[auto|flash|efficient|cudnn]
                       baseline 2: expand + concat + F.scaled_dot_product_attention with
                       attn_mask=causal_lower_right(T, P + T), PyTorch's choice and each backend forced
    sdpa_flash, sdpa_cudnn
                       baseline 2 on SDPA's flash / cuDNN kernel: expand + concat, P zero query rows in front so
                       that the causal mask is square, is_causal=True, the zero rows' output dropped (exact, the
                       backward too); GQA through enable_gqa where the backend takes it, else repeat_kv
    flex               baseline 3: expand + concat + torch.compile(flex_attention) with a block mask from
                       mask_mod ``kv < P or kv - P <= q + (Tk - Tq)``
    flex_packed        baseline 3, expansion-free: the batch packed into one sequence behind a single copy of
                       the prefix, a document mask keeping each batch row to its own text
    flash_attn         baseline 4: flash_attn_func(causal=True) on expand + concat (its causal mask is
                       bottom-right aligned), when flash-attn is importable

FLOPs (flash-attention's convention, so figures compare): fwd = 4 * B * Hq * T * D * (P + T / 2),
bwd = 2.5 * fwd, fwd+bwd = 3.5 * fwd (prefix_attn.reference.attention_flops). Times are medians
(triton.testing.do_bench on CUDA, torch.utils.benchmark on CPU). Peak memory (CUDA) is the peak allocated
above the inputs during one call: the forward for "fwd", forward + backward for "bwd" and "fwdbwd".

Results go to ``<out>/attention_<device>_<date>.json`` and ``.csv``; ``benchmarks/plot.py`` draws them.
The methods are in ``baselines.py``; inputs, timers and result files in ``common.py``; the targets, the table
and the summary in ``attention_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Dict

import torch
from attention_report import TARGET_SHAPE, evaluate_targets, fmt, summary, table, write
from baselines import GROUP, build_methods, prefix_attn_backend

# the baselines under this module too, as `bench_attention.make_sdpa` etc.
from baselines import additive_prefix_mask as additive_prefix_mask
from baselines import make_flex as make_flex
from baselines import make_sdpa as make_sdpa
from baselines import make_sdpa_square as make_sdpa_square
from baselines import peft_eager_attention as peft_eager_attention
from baselines import sdpa_square as sdpa_square
from common import (
    device_name,
    forward_backward,
    git_commit,
    is_oom,
    make_inputs,
    matmul_rate,
    max_rel_error,
    now,
    peak_memory_mib,
    result_path,
    short,
    tflops,
    time_mode,
    triton_version,
)

import prefix_attn
from prefix_attn.reference import attention_flops, prefix_attention_reference

MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Correctness: max |method - expected| <= TOL * max(1, max |expected|), for the output and every gradient.
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-8}
CHECK_SEQ = 96  # sequence length of the small correctness check against the float32 reference


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq: int
    head_dim: int

    def __str__(self) -> str:
        return f"B{self.batch} Hq{self.heads_q} Hkv{self.heads_kv} T{self.seq} D{self.head_dim}"


GPU_SHAPES = [
    Shape("llama-7b", 4, 32, 32, 2048, 128),
    Shape("gpt2-small", 8, 12, 12, 1024, 64),
    Shape("gpt2-medium", 8, 16, 16, 1024, 64),
    Shape("llama3-8b-gqa", 4, 32, 8, 4096, 128),
]
# Same heads and head_dim, batch and length cut down so that a 2-core CPU finishes.
CPU_SHAPES = [
    Shape("llama-7b", 1, 32, 32, 256, 128),
    Shape("gpt2-small", 1, 12, 12, 256, 64),
    Shape("gpt2-medium", 1, 16, 16, 256, 64),
    Shape("llama3-8b-gqa", 1, 32, 8, 512, 128),
]
EXTRA_SHAPES = [Shape("tiny", 1, 4, 2, 32, 16)]  # for smoke tests
PREFIX_LENS = (64, 200, 10)  # P=64 first: the matmul-rate target is stated there


# ----------------------------------------------------------------------------------------- the run
def run_config(args, shape: Shape, num_prefix: int, dtype, device, method_names, backend, record):
    """Check then time every method at one (shape, P, dtype); rows go to record(row)."""
    B, Hq, Hkv, T, D = shape.batch, shape.heads_q, shape.heads_kv, shape.seq, shape.head_dim
    group = Hq // Hkv
    scale = D**-0.5
    fwd_flops, bwd_flops = attention_flops(B, Hq, T, T, num_prefix, D, causal=True)
    flops = {"fwd": fwd_flops, "bwd": bwd_flops, "fwdbwd": fwd_flops + bwd_flops}
    base = {"shape": shape.name, "batch": B, "heads_q": Hq, "heads_kv": Hkv, "seq": T, "head_dim": D,
            "prefix": num_prefix, "dtype": str(dtype).replace("torch.", "")}

    # 1. small size: every method against the float32 reference on the same low-precision inputs.
    ts = min(T, CHECK_SEQ)
    small_leaves, small_dout = make_inputs(min(B, 2), Hq, Hkv, ts, ts, num_prefix, D, dtype, device, seed=1)
    # FlexAttention uncompiled here: this checks its mask_mod; the compiled kernel is checked at full size
    # against prefix_attn (and one compilation per config is enough).
    small_methods = build_methods(args, (min(B, 2), Hq, ts, D), min(B, 2), ts, num_prefix, dtype, device, scale,
                                  group, backend, method_names, compile_flex=False)

    def reference(q, k, v, pk, pv):
        return prefix_attention_reference(q, k, v, pk, pv, causal=True, softmax_scale=scale)

    ref_small = forward_backward(reference, small_leaves, small_dout)
    small_err: Dict[str, object] = {}
    fwd_only: Dict[str, str] = {}  # methods whose backward fails here (FlexAttention on the CPU): why
    for name, fn in small_methods.items():
        if isinstance(fn, str):
            small_err[name] = fn
            continue
        try:
            got = forward_backward(fn, small_leaves, small_dout)
            small_err[name] = max_rel_error([got[0]] + got[1], [ref_small[0]] + ref_small[1])
        except Exception as exc:  # noqa: BLE001
            small_err[name] = f"error: {type(exc).__name__}: {short(exc)}"
            try:  # a method without a backward is still worth a forward timing
                with torch.no_grad():
                    out = fn(*[t.detach() for t in small_leaves])
                small_err[name] = max_rel_error([out], [ref_small[0]])
                fwd_only[name] = f"no backward here: {type(exc).__name__}: {short(exc, 160)}"
            except Exception:  # noqa: BLE001
                pass
    del small_leaves, small_dout, ref_small, small_methods

    # 2. full size: every baseline against prefix_attn, then time.
    leaves, dout = make_inputs(B, Hq, Hkv, T, T, num_prefix, D, dtype, device)
    methods = build_methods(args, (B, Hq, T, D), B, T, num_prefix, dtype, device, scale, group, backend, method_names)
    tol = TOL[dtype]
    ours_full = None
    ours_ok = isinstance(small_err.get("prefix_attn"), float) and small_err["prefix_attn"] <= tol
    for name, fn in methods.items():
        status, err_full, expected_note = "ok", None, ""
        serr = small_err.get(name)
        if isinstance(fn, str):
            status = f"unavailable: {fn}"
        elif isinstance(serr, str):
            status = serr
        elif serr > tol:
            status = f"wrong vs reference: err {serr:.2e} > tol {tol:.0e}"
        else:
            try:
                if name in fwd_only:
                    with torch.no_grad():
                        got = (fn(*[t.detach() for t in leaves]), [])
                else:
                    got = forward_backward(fn, leaves, dout)
                if name == "prefix_attn":
                    ours_full = got
                elif ours_full is not None and ours_ok:
                    err_full = max_rel_error([got[0]] + got[1], [ours_full[0]] + ours_full[1])
                    if err_full > tol:
                        status = f"mismatch vs prefix_attn: err {err_full:.2e} > tol {tol:.0e}"
                else:
                    expected_note = " (not compared at full size: prefix_attn failed)"
                del got
            except Exception as exc:  # noqa: BLE001
                status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {short(exc)}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for mode in args.modes:
            row = dict(base, mode=mode, method=name, baseline=GROUP.get(name, "?"), status=status + expected_note,
                       ms=None, tflops=None, peak_mib=None, flops=flops[mode],
                       err_vs_reference_small=serr if isinstance(serr, float) else None, err_vs_prefix_attn=err_full)
            if status == "ok" and name in fwd_only and mode != "fwd":
                row["status"] = f"unavailable: {fwd_only[name]}"
            elif status == "ok":
                if name in fwd_only:
                    row["note"] = "forward under no_grad: this method has no backward here"
                try:
                    row.update(time_mode(mode, fn, leaves, dout, device, args, grad=name not in fwd_only))
                    row["tflops"] = tflops(flops[mode], row["ms"])
                except Exception as exc:  # noqa: BLE001
                    row["status"] = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {short(exc)}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            record(row)
    del ours_full, leaves, dout, methods
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_at_p0(args, shape: Shape, dtype, device, backend) -> dict:
    """prefix_attn's own peak at P=0 (forward and forward+backward): the memory target's yardstick."""
    B, Hq, Hkv, T, D = shape.batch, shape.heads_q, shape.heads_kv, shape.seq, shape.head_dim
    leaves, dout = make_inputs(B, Hq, Hkv, T, T, 0, D, dtype, device)

    def ours(*xs):
        return prefix_attn.prefix_attention(*xs, causal=True, backend=backend)

    out = {"shape": shape.name, "dtype": str(dtype).replace("torch.", ""), "prefix": 0}
    try:
        out["fwd_peak_mib"] = peak_memory_mib(lambda: ours(*leaves), device, leaves)
        out["fwdbwd_peak_mib"] = peak_memory_mib(lambda: ours(*leaves).backward(dout), device, leaves)
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        out["status"] = f"error: {type(exc).__name__}: {short(exc)}"
    return out



def metadata(args, device, backend, backend_note) -> dict:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "prefix_attn": prefix_attn.__version__,
        "prefix_attn_backend": f"{backend} ({backend_note})",
        "backends": prefix_attn.available_backends(),
        "date": now(),
        "git_commit": git_commit(),
        "argv": sys.argv[1:],
        "modes": list(args.modes),
        "scaled_down": device.type == "cpu" and not args.full_shapes_on_cpu,
        "flops": "fwd = 4*B*Hq*T*D*(P + T/2), bwd = 2.5*fwd, fwdbwd = 3.5*fwd (flash-attention convention)",
        "peak_memory": "peak allocated above the inputs during one call (fwd: forward; bwd, fwdbwd: "
        "forward + backward)",
        "timing": "triton.testing.do_bench median" if device.type == "cuda"
        else "torch.utils.benchmark blocked_autorange median",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="GPU: llama-7b, P=64, bfloat16 only. CPU: two small shapes, P=64, flex uncompiled")
    p.add_argument("--shapes", default=None, help="comma list of shape names (default: all); "
                   + ", ".join(s.name for s in GPU_SHAPES + EXTRA_SHAPES))
    p.add_argument("--prefix", default=None, help="comma list of prefix lengths P (default 64,200,10)")
    p.add_argument("--dtypes", default=None,
                   help="comma list: bfloat16,float16,float32 (default: bfloat16,float16 on CUDA, float32 on CPU)")
    p.add_argument("--modes", default="fwd,bwd,fwdbwd", help="comma list of fwd,bwd,fwdbwd")
    p.add_argument("--methods", default=None, help="comma list (default: all): " + ", ".join(GROUP))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--full-shapes-on-cpu", action="store_true", help="use the GPU shapes on the CPU too")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; configs not started by then are skipped (and listed)")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--cpu-min-run-time", type=float, default=None, help="seconds per CPU measurement")
    p.add_argument("--no-table", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type == "cpu"
    if args.cpu_min_run_time is None:
        args.cpu_min_run_time = 0.05 if args.quick else 0.3
    shapes = CPU_SHAPES if (on_cpu and not args.full_shapes_on_cpu) else GPU_SHAPES
    by_name = {s.name: s for s in EXTRA_SHAPES + shapes}
    if args.shapes:
        unknown = [n for n in args.shapes.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; known: {sorted(by_name)}")
        shapes = [by_name[n] for n in args.shapes.split(",")]
    elif args.quick:
        shapes = [by_name["gpt2-small"], by_name["llama3-8b-gqa"]] if on_cpu else [by_name[TARGET_SHAPE]]
    if args.prefix:
        prefixes = [int(x) for x in args.prefix.split(",")]
    else:
        prefixes = [64] if args.quick else list(PREFIX_LENS)
    if args.dtypes:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    else:
        dtypes = [torch.float32] if on_cpu else ([torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16])
    names = args.methods.split(",") if args.methods else list(GROUP)

    backend, backend_note = prefix_attn_backend(device)
    print(f"prefix_attn: backend {backend!r}: {backend_note}")
    if on_cpu:
        print(f"no CUDA: CPU run, {'SCALED-DOWN shapes' if not args.full_shapes_on_cpu else 'GPU shapes'}, "
              f"{torch.get_num_threads()} threads; peak memory is not measured on the CPU")
        if args.quick and any(n.startswith("flex") for n in names):
            print("flex: --quick on the CPU runs FlexAttention uncompiled (compiling takes ~20 s a shape here)")
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    results = {"meta": metadata(args, device, backend, backend_note), "matmul": {}, "rows": [], "memory_p0": [],
               "skipped": [], "targets": []}
    json_path = result_path(args.out, "attention", results["meta"]["device_name"])
    csv_path = json_path[:-5] + ".csv"
    results["meta"].update(shapes=[dataclasses.asdict(s) for s in shapes], prefixes=prefixes,
                           dtypes=[str(d).replace("torch.", "") for d in dtypes], methods=names)

    for dt in dtypes:
        results["matmul"][str(dt).replace("torch.", "")] = matmul_rate(dt, device, args)

    def record(row):
        results["rows"].append(row)
        print(f"  {row['shape']} {row['dtype']} P={row['prefix']} {row['mode']:6s} {row['method']:16s} "
              f"{fmt(row['ms'], '.3f')} ms  {row['status'][:100]}", flush=True)

    # Priority order, so that a time budget cuts the least important configs: dtype, then shape, then P.
    for dt in dtypes:
        for shape in shapes:
            for p in prefixes:
                if args.time_budget is not None and time.time() - t_start > args.time_budget:
                    results["skipped"].append(f"{shape.name} {str(dt)[6:]} P={p}")
                    continue
                try:
                    run_config(args, shape, p, dt, device, names, backend, record)
                except Exception as exc:  # noqa: BLE001 - keep the rest of the run
                    traceback.print_exc()
                    results["rows"].append({"shape": shape.name, "dtype": str(dt)[6:], "prefix": p, "mode": "-",
                                            "method": "-", "baseline": "-", "ms": None, "tflops": None,
                                            "peak_mib": None,
                                            "status": f"config failed: {type(exc).__name__}: {short(exc)}"})
                write(results, json_path, csv_path)
            over_budget = args.time_budget is not None and time.time() - t_start > args.time_budget
            if 200 in prefixes and not on_cpu and "prefix_attn" in names and not over_budget:
                results["memory_p0"].append(memory_at_p0(args, shape, dt, device, backend))
    results["targets"] = evaluate_targets(results)
    results["meta"]["wall_s"] = round(time.time() - t_start, 1)
    write(results, json_path, csv_path)
    if not args.no_table:
        print()
        print(table(results))
    print()
    print(f"wrote {json_path}\n      {csv_path}")
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
