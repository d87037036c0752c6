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
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prefix_attn import prefix_attention, prefix_attention_reference  # noqa: E402

CONFIGS = [(4, 8, 512, 64, 32), (2, 16, 1024, 128, 64)]  # (batch, heads, len, head_dim, num_prefix)


def eager_capped(q, k, v, pk, pv, softcap):
    batch, heads, length, dim = q.shape
    keys = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    s = torch.matmul(q, keys.transpose(-1, -2)) * dim**-0.5
    s = torch.tanh(s / softcap) * softcap
    num_prefix = pk.shape[1]
    visible = torch.ones(length, num_prefix + length, dtype=torch.bool).tril(num_prefix)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--softcap", type=float, default=50.0)
    args = parser.parse_args()
    cap = args.softcap
    variants = {
        "cpu": lambda *t: prefix_attention(*t, backend="cpu"),
        "cpu+cap": lambda *t: prefix_attention(*t, softcap=cap, backend="cpu"),
        "eager+cap": lambda *t: eager_capped(*t, cap),
    }
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          f", float32 forward+backward, softcap={cap}, median of {args.rounds} rounds")
    print("| B | H | T | D | P | cpu ms | cpu+cap ms | eager+cap ms | cap cost (cpu+cap / cpu) | eager+cap / cpu+cap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cfg in CONFIGS:
        B, H, T, D, P = cfg
        g = torch.Generator().manual_seed(0)
        shapes = [(B, H, T, D), (B, H, T, D), (B, H, T, D), (H, P, D), (H, P, D)]
        base = [torch.randn(*s, generator=g) * 2 for s in shapes]  # scale 2: the cap acts on part of the scores
        dout = torch.randn(B, H, T, D, generator=g)
        small = [t[:1, :2, :33] if t.dim() == 4 else t[:2, :5] for t in base]
        ref = prefix_attention_reference(*[t.double() for t in small], softcap=cap)
        for name in ("cpu+cap", "eager+cap"):
            got = variants[name](*small)
            err = (got.double() - ref).abs().max().item()
            assert err < 1e-4, f"{name}: error {err} against the float64 reference"
        times = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds + 1):
            order = names[r % 3:] + names[:r % 3]
            for name in order:
                leaves = [t.clone().requires_grad_() for t in base]
                start = time.perf_counter()
                variants[name](*leaves).backward(dout)
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        cost = statistics.median(a / b for a, b in zip(times["cpu+cap"], times["cpu"]))
        vs = statistics.median(a / b for a, b in zip(times["eager+cap"], times["cpu+cap"]))
        print(f"| {B} | {H} | {T} | {D} | {P} | {med['cpu']:.1f} | {med['cpu+cap']:.1f} | {med['eager+cap']:.1f} "
              f"| {cost:.2f}x | {vs:.2f}x |")


if __name__ == "__main__":
    main()
