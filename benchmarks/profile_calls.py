"""Host time against device time of one training call and one decode call, from a ``torch.profiler`` trace.

    python benchmarks/profile_calls.py [--out DIR] [--shapes gpt2-small,llama-7b] [--prefix 64]
    python benchmarks/profile_calls.py --device cpu --shapes tiny      # smoke run: CPU activities only

A training call is ``prefix_attention`` forward + backward (bf16, causal, the prefix trainable) at the layer shape;
a decode call one step of ``len_q = 1`` queries against the cache with no gradient (bench_decode's shapes). Each is
run a few times to warm up, then ``--calls`` times under the profiler (CPU and CUDA activities). Per call it
reports the wall time, the host time of the Python call (the profiler's top-level CPU events, which end when the
last launch is queued), the device time (the sum of the CUDA kernels' durations) and the kernels launched; a host
time above the device time means the GPU waits on Python. Results: ``<out>/profile_<device>_<date>.json`` and
``.md``, and one Chrome trace per call kind (``trace_<shape>_<call>.json``, open in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, git_commit, now, result_path, triton_version, write_json  # noqa: E402

import prefix_attn  # noqa: E402

# name: (batch, heads_q, heads_kv, text length = cache length, head_dim)
SHAPES = {
    "gpt2-small": (8, 12, 12, 1024, 64),
    "llama-7b": (4, 32, 32, 2048, 128),
    "llama3-8b-gqa": (4, 32, 8, 4096, 128),
    "tiny": (2, 4, 2, 64, 16),
}


def _inputs(shape, num_prefix, len_q, dtype, device, grad):
    batch, heads_q, heads_kv, length, head_dim = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    q = rnd(batch, heads_q, len_q, head_dim)
    k, v = rnd(batch, heads_kv, length, head_dim), rnd(batch, heads_kv, length, head_dim)
    pk, pv = rnd(heads_kv, num_prefix, head_dim), rnd(heads_kv, num_prefix, head_dim)
    if grad:
        for t in (q, k, v, pk, pv):
            t.requires_grad_(True)
    return q, k, v, pk, pv


def make_call(kind, shape, num_prefix, dtype, device, backend):
    """A zero-argument callable: one training call (fwd + bwd) or one decode step (no grad)."""
    if kind == "train":
        q, k, v, pk, pv = _inputs(shape, num_prefix, shape[3], dtype, device, True)
        dout = torch.randn_like(q)

        def call():
            out = prefix_attn.prefix_attention(q, k, v, pk, pv, backend=backend)
            torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    else:
        q, k, v, pk, pv = _inputs(shape, num_prefix, 1, dtype, device, False)

        def call():
            with torch.no_grad():
                prefix_attn.prefix_attention(q, k, v, pk, pv, backend=backend)
    return call


def profile(call, calls: int, device, trace_path=None) -> dict:
    """{wall_us, host_us, device_us, kernels}: medians per call over ``calls`` profiled calls."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        call()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with torch_profile(activities=activities) as prof:
        for i in range(calls):
            sync()
            t0 = time.perf_counter()
            with record_function(f"call_{i}"):
                call()
            sync()
            walls.append((time.perf_counter() - t0) * 1e6)
    events = prof.events()
    host = [e.time_range.elapsed_us() for e in events if e.name.startswith("call_")]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if trace_path:
        prof.export_chrome_trace(trace_path)
    return dict(wall_us=statistics.median(walls), host_us=statistics.median(host),
                device_us=sum(e.device_time_total for e in kernels) / calls if kernels else None,
                kernels=len(kernels) / calls if kernels else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gpt2-small,llama-7b,llama3-8b-gqa", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--prefix", type=int, default=64)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--backend", default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    meta = dict(device=device_name(device), torch=torch.__version__, triton=triton_version(), commit=git_commit(),
                date=now(), prefix=args.prefix, dtype=args.dtype, calls=args.calls)
    json_path = result_path(args.out, "profile", meta["device"])
    for name in args.shapes.split(","):
        for kind in ("train", "decode"):
            call = make_call(kind, SHAPES[name], args.prefix, dtype, device, args.backend)
            trace = os.path.join(args.out, f"trace_{name}_{kind}.json")
            row = dict(shape=name, call=kind, **profile(call, args.calls, device, trace))
            rows.append(row)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            write_json(json_path, dict(meta, rows=rows))
    lines = [f"# Host and device time per call ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['commit']}, {meta['date']}, {args.dtype}, P={args.prefix})", "",
             "| shape | call | wall µs | host µs | device µs | kernels |", "|---|---|---|---|---|---|"]
    for r in rows:
        dev = "-" if r["device_us"] is None else f"{r['device_us']:.1f}"
        ker = "-" if r["kernels"] is None else f"{r['kernels']:.1f}"
        lines.append(f"| {r['shape']} | {r['call']} | {r['wall_us']:.1f} | {r['host_us']:.1f} | {dev} | {ker} |")
    with open(json_path[:-5] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
