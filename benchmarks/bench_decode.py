"""Decoding with a KV cache: prefix_attn against expand + concat + SDPA, eager and under CUDA graphs.

    python benchmarks/bench_decode.py [--out DIR] [--len-q 1,16] [--shapes gpt2-small,llama3-8b-gqa] [--prefix 64]
    python benchmarks/bench_decode.py --device cpu --shapes tiny      # smoke run: eager only

One step of decoding attends ``len_q`` new queries (1: sampling, 16: speculative or chunked decoding) to a cache
of ``cache`` text keys plus the prefix. Such a call is microseconds of GPU work, so launch overhead decides:
``eager`` is ``triton.testing.do_bench`` (host launch cost included), ``graph`` is
``triton.testing.do_bench_cudagraph`` (the same call captured in a CUDA graph and replayed: device time), and
their gap is the host's share. Each method's output is checked against the float32 reference before timing.
Times are medians in microseconds. Results: ``<out>/decode_<device>_<date>.json`` and ``.md``, rewritten after
every row so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baselines import make_sdpa  # noqa: E402
from common import (  # noqa: E402
    device_name,
    git_commit,
    make_inputs,
    max_rel_error,
    now,
    result_path,
    triton_version,
    write_json,  # noqa: E402
)

import prefix_attn  # noqa: E402
from prefix_attn.reference import prefix_attention_reference  # noqa: E402

# name: (batch, heads_q, heads_kv, cache length, head_dim)
SHAPES = {
    "gpt2-small": (8, 12, 12, 1024, 64),
    "llama3-8b-gqa": (4, 32, 8, 4096, 128),
    "llama-7b": (4, 32, 32, 2048, 128),
    "tiny": (2, 4, 2, 64, 16),
}
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gpt2-small,llama3-8b-gqa", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--len-q", default="1,16", help="comma list of new queries per step")
    p.add_argument("--prefix", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(str(d)[6:] for d in TOL))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench / do_bench_cudagraph repetition time")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def methods(backend: str, shape_q, cache: int, num_prefix: int, scale: float, group: int) -> dict:
    def ours(q, k, v, pk, pv):
        return prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, softmax_scale=scale, backend=backend)

    return {"prefix_attn": ours, "sdpa[auto]": make_sdpa("auto", shape_q, cache, num_prefix, scale, group)}


def time_us(fn, device, rep_ms: int, graph: bool):
    if device.type != "cuda":
        if graph:
            return None
        import torch.utils.benchmark as tbench  # noqa: PLC0415

        fn()
        return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.05).median * 1e6
    import triton.testing  # noqa: PLC0415

    if graph:  # captures about rep_ms of calls unrolled into one graph, on a side stream of its own
        return float(triton.testing.do_bench_cudagraph(fn, rep=min(rep_ms, 20), return_mode="median")) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")) * 1e3


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Decode attention, {meta['device_name']}", "",
             f"{meta['dtype']}, P={meta['prefix']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['git_commit']}, {meta['date']}. Median microseconds per call; eager = do_bench, "
             f"graph = do_bench_cudagraph.", "",
             "| shape | len_q | cache | method | eager us | graph us | host us | vs sdpa (eager) | vs sdpa (graph) | "
             "max rel err |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    for r in results["rows"]:
        host = None if r["graph_us"] is None or r["eager_us"] is None else r["eager_us"] - r["graph_us"]
        lines.append(f"| {r['shape']} | {r['len_q']} | {r['cache']} | {r['method']} | {f(r['eager_us'])} | "
                     f"{f(r['graph_us'])} | {f(host)} | {f(r.get('speedup_eager'), '.2f')} | "
                     f"{f(r.get('speedup_graph'), '.2f')} | {f(r['max_rel_err'], '.1e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    backend = "triton" if device.type == "cuda" else None
    results = {"meta": {"device_name": device_name(device), "torch": torch.__version__, "triton": triton_version(),
                        "cuda": torch.version.cuda, "dtype": args.dtype, "prefix": args.prefix, "date": now(),
                        "git_commit": git_commit(), "argv": sys.argv[1:]}, "rows": []}
    path = result_path(args.out, "decode", results["meta"]["device_name"])
    t0 = time.time()
    for name in args.shapes.split(","):
        batch, heads_q, heads_kv, cache, head_dim = SHAPES[name]
        for len_q in (int(x) for x in args.len_q.split(",")):
            leaves, _ = make_inputs(batch, heads_q, heads_kv, len_q, cache, args.prefix, head_dim, dtype, device,
                                    requires_grad=False)
            scale = head_dim**-0.5
            ref = prefix_attention_reference(*(t.float() for t in leaves), causal=True, softmax_scale=scale)
            rows = {}
            for method, fn in methods(backend, leaves[0].shape, cache, args.prefix, scale, heads_q // heads_kv).items():
                row = {"shape": name, "len_q": len_q, "cache": cache, "method": method, "eager_us": None,
                       "graph_us": None, "max_rel_err": None, "status": "ok"}
                try:
                    with torch.no_grad():
                        row["max_rel_err"] = max_rel_error([fn(*leaves)], [ref])
                        if row["max_rel_err"] > TOL[dtype]:
                            row["status"] = f"wrong: max rel error {row['max_rel_err']:.2e} > {TOL[dtype]}"
                        else:
                            call = functools.partial(fn, *leaves)
                            row["eager_us"] = time_us(call, device, args.rep_ms, graph=False)
                            row["graph_us"] = time_us(call, device, args.rep_ms, graph=True)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    row["status"] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                rows[method] = row
                results["rows"].append(row)
            base = rows.get("sdpa[auto]")
            for row in rows.values():
                for mode in ("eager", "graph"):
                    if base and base[f"{mode}_us"] and row[f"{mode}_us"]:
                        row[f"speedup_{mode}"] = base[f"{mode}_us"] / row[f"{mode}_us"]
                print(f"  {name} len_q={len_q} {row['method']:12s} eager {row['eager_us']} us graph "
                      f"{row['graph_us']} us {row['status']}", flush=True)
            write_json(path, results)
            with open(path[:-5] + ".md", "w") as f:
                f.write(markdown(results))
    results["meta"]["wall_s"] = round(time.time() - t0, 1)
    write_json(path, results)
    print(markdown(results))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
