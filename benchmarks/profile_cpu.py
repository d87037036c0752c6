"""Where the native CPU kernel's time goes, per phase, at the shapes of ``bench_cpu.py``.

    python benchmarks/profile_cpu.py                  # float32, the three shapes of bench_cpu.py
    python benchmarks/profile_cpu.py --dtype bfloat16

Times (median of ``--rounds``, ms) of the extension's entry points called directly, no autograd:
  * ``fwd``: the forward (scores, online softmax, P.V);
  * ``bwd``: the whole backward (dQ, dK/dV and the prefix gradients);
  * ``bwd dq`` / ``bwd dkv`` / ``bwd prefix``: the backward asked for one of them only (the kernel skips the
    products the others need; each still recomputes the probabilities, so the three add up to more than ``bwd``);
  * ``convert``: for 16-bit inputs, the float32 copies of q, k, v the forward makes (0 for float32).
The split inside a phase (BLAS tile products against the softmax passes) comes from a sampling profiler, e.g.
``perf record -D 9000 python benchmarks/profile_cpu.py --rounds 30`` then ``perf report --sort dso,symbol``:
MKL's ``sgemm`` kernel and ``scopy`` packing routines are the tile products, ``prefix_attn::fwd_rows`` /
``bwd_rows`` the softmax passes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_cpu import CONFIGS  # noqa: E402
from common import cpu_model, make_inputs  # noqa: E402

from prefix_attn.reference import attention_flops  # noqa: E402


def median_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def phases(cfg, dtype, rounds: int) -> dict:
    from prefix_attn import cpu as cpu_backend

    ext = cpu_backend._load()[0]
    B, H, T, D, P = cfg
    (q, k, v, pk, pv), dout = make_inputs(B, H, H, T, T, P, D, dtype=dtype, seed=0, requires_grad=False)
    sc = D**-0.5
    out, lse = ext.fwd(q, k, v, pk, pv, None, True, sc)

    def bwd(dq=True, dkv=True, dprefix=True):
        return lambda: ext.bwd(dout, q, k, v, pk, pv, None, out, lse, True, sc, need_dq=dq, need_dkv=dkv,
                               need_dprefix=dprefix)

    res = {
        "fwd": median_ms(lambda: ext.fwd(q, k, v, pk, pv, None, True, sc), rounds),
        "bwd": median_ms(bwd(), rounds),
        "bwd dq": median_ms(bwd(True, False, False), rounds),
        "bwd dkv": median_ms(bwd(False, True, False), rounds),
        "bwd prefix": median_ms(bwd(False, False, True), rounds),
        "convert": 0.0 if dtype == torch.float32 else median_ms(lambda: [t.float() for t in (q, k, v)], rounds),
    }
    fwd_flops, bwd_flops = attention_flops(B, H, T, T, P, D)
    res["fwd GFLOP/s"] = fwd_flops / res["fwd"] / 1e6
    res["bwd GFLOP/s"] = bwd_flops / res["bwd"] / 1e6
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    dtype = getattr(torch, args.dtype)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, "
          f"median of {args.rounds}, ms")
    cols = ["fwd", "bwd", "bwd dq", "bwd dkv", "bwd prefix", "convert", "fwd GFLOP/s", "bwd GFLOP/s"]
    print(f"{'B':>2} {'H':>3} {'T':>5} {'D':>4} {'P':>4} | " + " ".join(f"{c:>11}" for c in cols))
    for cfg in CONFIGS:
        r = phases(cfg, dtype, args.rounds)
        print(f"{cfg[0]:>2} {cfg[1]:>3} {cfg[2]:>5} {cfg[3]:>4} {cfg[4]:>4} | "
              + " ".join(f"{r[c]:11.1f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
