"""A bank of prefixes chosen per row, against the shared path and against gather + expand/concat + SDPA.

    python benchmarks/bench_bank.py [--rounds 9] [--quick] [--backend cpu|triton] [--dtype float32]

Forward + backward, every variant timed once per round (order rotated), medians and the median of per-round
ratios; correctness against the float64 reference first. Per shape:

* ``shared``: ``prefix_attention(q, k, v, pk, pv)`` with one ``[Hkv, P, D]`` prefix;
* ``bank-1``: the same prefix as entry 0 of a bank ``[B, Hkv, P, D]``, every row on it (``prefix_ids = 0``):
  what choosing per row costs when nothing differs;
* ``bank-B``: B distinct entries, one per row (``prefix_ids = arange(B)``);
* ``gather-sdpa``: what one does without the bank: ``bank[ids]`` gathered into ``[B, Hkv, P, D]``, concatenated
  with the text K/V and run through SDPA with a bottom-right causal mask (the gather's backward sums per entry).

Runs on the CPU (``--backend cpu``, the native kernel) or on a GPU (``--backend triton``). The two ratios are
``bank-1 / shared`` (target <= 1.05) and ``gather-sdpa / bank-B`` (target > 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import cpu_model, device_name, fwd_bwd_side_by_side, round_ratios  # noqa: E402

from prefix_attn import prefix_attention, prefix_attention_reference  # noqa: E402

CONFIGS = [(4, 12, 512, 64, 10), (4, 12, 512, 64, 200), (8, 8, 256, 64, 64)]  # (batch, heads, len, head_dim, P)
QUICK = [(4, 8, 256, 64, 32)]


def gather_sdpa(q, k, v, bank_k, bank_v, ids):
    from torch.nn.attention.bias import causal_lower_right

    keys = torch.cat([bank_k[ids], k], dim=2)
    values = torch.cat([bank_v[ids], v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def bench_shape(B, H, T, D, P, device, dtype, be, rounds) -> str:
    """One table row: the four variants side by side at one shape."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    q, k, v, dout = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    bank_k, bank_v = rnd(B, H, P, D), rnd(B, H, P, D)
    same = torch.zeros(B, dtype=torch.long, device=device)
    distinct = torch.arange(B, device=device)
    variants = {
        "shared": lambda q, k, v, bk, bv: prefix_attention(q, k, v, bk[0], bv[0], backend=be),
        "bank-1": lambda q, k, v, bk, bv: prefix_attention(q, k, v, bk, bv, prefix_ids=same, backend=be),
        "bank-B": lambda q, k, v, bk, bv: prefix_attention(q, k, v, bk, bv, prefix_ids=distinct, backend=be),
        "gather-sdpa": lambda q, k, v, bk, bv: gather_sdpa(q, k, v, bk, bv, distinct),
    }
    small = [t[:, :2, :40].double() for t in (q, k, v)] + [t[:, :2].double() for t in (bank_k, bank_v)]
    want = prefix_attention_reference(*small, prefix_ids=distinct.cpu() if device.type == "cpu" else distinct)
    for name in ("bank-B", "gather-sdpa"):
        got = variants[name](*[t.to(dtype) for t in small])
        err = (got.double() - want).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), f"{name}: error {err} against float64"

    times = fwd_bwd_side_by_side(variants, (q, k, v, bank_k, bank_v), dout, device, rounds)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    overhead = statistics.median(round_ratios(times, "bank-1", "shared"))
    speedup = statistics.median(round_ratios(times, "gather-sdpa", "bank-B"))
    return (f"| {B} | {H} | {T} | {D} | {P} | {med['shared']:.1f} | {med['bank-1']:.1f} | {med['bank-B']:.1f} "
            f"| {med['gather-sdpa']:.1f} | {overhead:.3f}x | {speedup:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 rounds")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "triton"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.backend == "triton" else "cpu")
    dtype = getattr(torch, args.dtype)
    rounds = 3 if args.quick else args.rounds
    be = args.backend
    print(f"# {device_name(device, cpu_model())}, torch {torch.__version__}, backend {be}, {args.dtype} "
          f"forward+backward, median of {rounds} rounds")
    print("| B | H | T | D | P | shared ms | bank-1 ms | bank-B ms | gather-sdpa ms | bank-1 / shared "
          "| gather-sdpa / bank-B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, H, T, D, P in QUICK if args.quick else CONFIGS:
        print(bench_shape(B, H, T, D, P, device, dtype, be, rounds))


if __name__ == "__main__":
    main()
