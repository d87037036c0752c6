"""Logit softcapping on the CPU: the native kernel with ``softcap=0`` and ``softcap>0``, and Gemma 2's eager path.

    python benchmarks/bench_softcap_cpu.py [--rounds 9] [--softcap 50]

Three variants, forward + backward in float32, measured side by side in every round (order rotated), median
per variant and median of per-round ratios:

* ``cpu``: ``prefix_attention(..., backend="cpu")`` (no capping: the plain path);
* ``cpu+cap``: the same with ``softcap``;
* ``eager+cap``: what PEFT runs on Gemma 2 (``attn_implementation="eager"``): the prefix expanded over the batch
  and concatenated with the text K/V, ``q @ k^T * scale``, ``cap * tanh(s / cap)``, masked softmax, ``@ v``,
  backward through autograd.

Correctness first: ``cpu+cap`` and ``eager+cap`` are compared with the float64 reference before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from baselines import eager_softcap_attention  # noqa: E402
from common import cpu_arch, make_inputs, round_ratios, side_by_side  # noqa: E402

from prefix_attn import prefix_attention, prefix_attention_reference  # noqa: E402

CONFIGS = [(4, 8, 512, 64, 32), (2, 16, 1024, 128, 64)]  # (batch, heads, len, head_dim, num_prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--softcap", type=float, default=50.0)
    args = parser.parse_args()
    cap = args.softcap
    variants = {
        "cpu": lambda *t: prefix_attention(*t, backend="cpu"),
        "cpu+cap": lambda *t: prefix_attention(*t, softcap=cap, backend="cpu"),
        "eager+cap": lambda *t: eager_softcap_attention(*t, cap),
    }
    print(f"# {cpu_arch()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          f", float32 forward+backward, softcap={cap}, median of {args.rounds} rounds")
    print("| B | H | T | D | P | cpu ms | cpu+cap ms | eager+cap ms | cap cost (cpu+cap / cpu) | eager+cap / cpu+cap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cfg in CONFIGS:
        B, H, T, D, P = cfg
        leaves, dout = make_inputs(B, H, H, T, T, P, D, requires_grad=False)
        base = [t * 2 for t in leaves]  # scale 2: the cap acts on part of the scores
        small = [t[:1, :2, :33] if t.dim() == 4 else t[:2, :5] for t in base]
        ref = prefix_attention_reference(*[t.double() for t in small], softcap=cap)
        for name in ("cpu+cap", "eager+cap"):
            got = variants[name](*small)
            err = (got.double() - ref).abs().max().item()
            assert err < 1e-4, f"{name}: error {err} against the float64 reference"

        def prepare(name, base=base, dout=dout):  # fresh leaves for each call, made outside the timing
            leaves = [t.clone().requires_grad_() for t in base]
            return lambda: variants[name](*leaves).backward(dout)

        times = side_by_side(prepare, variants, args.rounds, warmup=1)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        cost = statistics.median(round_ratios(times, "cpu+cap", "cpu"))
        vs = statistics.median(round_ratios(times, "eager+cap", "cpu+cap"))
        print(f"| {B} | {H} | {T} | {D} | {P} | {med['cpu']:.1f} | {med['cpu+cap']:.1f} | {med['eager+cap']:.1f} "
              f"| {cost:.2f}x | {vs:.2f}x |")


if __name__ == "__main__":
    main()
