"""One decoding step on the CPU with a long shared prefix: prefix_attn against SDPA on the caches PEFT-style decoding
builds, float32 (or bfloat16), side by side.

    python benchmarks/bench_decode_cpu.py            # the issue's shapes; results in benchmarks/results/
    python benchmarks/bench_decode_cpu.py --dtype bfloat16   # all variants in bfloat16 (*_bfloat16.md)
    python benchmarks/bench_decode_cpu.py --quick    # fewer rounds
    python benchmarks/bench_decode_cpu.py --threshold  # the decode path forced on / off at small batches

Variants, all on the same q, text cache and prefix (``len_q`` new queries, bottom-right causal):

* ``prefix_attn``: ``prefix_attention(q, k, v, prefix_k, prefix_v)`` under ``torch.no_grad()``: the decode path
  (``prefix_attn/decode.py``: the prefix part one product per kv head for every row, the text part the C++
  kernel);
* ``fused``: the C++ kernel alone (what a training forward runs), the prefix read once per row;
* ``sdpa expanded``: ``F.scaled_dot_product_attention`` on a cache that already holds the prefix copied into
  every row, ``[B, Hkv, P + T, D]`` (what PEFT's ``generate()`` decodes with), built outside the timing;
* ``sdpa concat``: the same after building that cache in the step (``torch.cat`` of the expanded prefix and the
  text cache), as a model would that keeps the prefix apart.

Method: the variants are timed once per round, the first one rotating, for ``--rounds`` rounds after a warm-up;
the table gives each median and the median of the per-round ratios (robust to a busy spell of the machine). Every
variant's output is checked against the float64 reference first. "cache MiB" is what each keeps between steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cpu_model, git_commit, round_ratios, side_by_side, write_cpu_markdown  # noqa: E402

from prefix_attn import ops, prefix_attention, prefix_attention_reference  # noqa: E402

# (batch, heads_q, heads_kv, text cache, prefix, head_dim, bank entries or 0)
SHAPES = [
    (64, 12, 12, 256, 2048, 64, 0),
    (32, 32, 8, 512, 1024, 128, 0),
    (64, 12, 12, 128, 512, 64, 4),
    (32, 12, 12, 256, 512, 64, 0),
    (1, 12, 12, 256, 2048, 64, 0),
    (1, 32, 8, 512, 1024, 128, 0),
]


def make(shape, len_q, seed=0, dtype=torch.float32):
    B, Hq, Hkv, T, P, D, N = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g)

    q, k, v = rnd(B, Hq, len_q, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    lead = (N,) if N else ()
    pk, pv = rnd(*lead, Hkv, P, D), rnd(*lead, Hkv, P, D)
    ids = torch.randint(0, N, (B,), generator=g) if N else None
    return (*(t.to(dtype) for t in (q, k, v, pk, pv)), ids)


def expanded(prefix, ids, text):
    """[B, Hkv, P + T, D]: the prefix (each row's entry) copied into every row before its text cache."""
    rows = prefix[ids] if ids is not None else prefix.unsqueeze(0).expand(text.shape[0], -1, -1, -1)
    return torch.cat([rows, text], 2)


def sdpa(q, k, v, len_q):
    mask = None
    if len_q > 1:  # bottom-right causal: query i sees keys j <= Tk - len_q + i
        Tk = k.shape[2]
        mask = torch.ones(len_q, Tk, dtype=torch.bool).tril(Tk - len_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def variants(q, k, v, pk, pv, ids, len_q):
    bank = {} if ids is None else {"prefix_ids": ids}
    ek, ev = expanded(pk, ids, k), expanded(pv, ids, v)
    scale = q.shape[-1] ** -0.5

    def ours():
        return prefix_attention(q, k, v, pk, pv, **bank)

    def fused():
        return ops.PrefixAttentionFunction.apply(q, k, v, pk, pv, None, ids, None, None, None, 0, 0, True, scale,
                                                 0.0, 0.0, None, "cpu")

    def concat():
        return sdpa(q, expanded(pk, ids, k), expanded(pv, ids, v), len_q)

    return {"prefix_attn": ours, "fused": fused, "sdpa expanded": lambda: sdpa(q, ek, ev, len_q),
            "sdpa concat": concat}


def cache_mib(shape, name, element_size=4):
    B, Hq, Hkv, T, P, D, N = shape
    prefix = (N or 1) * Hkv * P * D
    kept = B * Hkv * (P + T) * D if name == "sdpa expanded" else B * Hkv * T * D + prefix
    return 2 * element_size * kept / 2**20


def threshold(rounds, len_qs=(1, 16), batches=(1, 2, 4, 8, 16)):
    """The decode path forced on and off (``decode.DECODE_MIN_*``) at small batches: where it starts to pay."""
    from prefix_attn import decode

    saved = decode.DECODE_MIN_ROWS, decode.DECODE_MIN_READERS
    print("| len_q | shape | decode path ms | fused ms | fused / decode |\n|---|---|---|---|---|")
    try:
        for len_q in len_qs:
            for B in batches:
                for Hq, Hkv, T, P, D in ((12, 12, 256, 2048, 64), (32, 8, 512, 1024, 128)):
                    q, k, v, pk, pv, _ = make((B, Hq, Hkv, T, P, D, 0), len_q)

                    def run(on, q=q, k=k, v=v, pk=pk, pv=pv):
                        def call():
                            decode.DECODE_MIN_ROWS, decode.DECODE_MIN_READERS = (1, 1) if on else (10**9, 10**9)
                            return prefix_attention(q, k, v, pk, pv)
                        return call

                    with torch.no_grad():
                        times = side_by_side(lambda name, run=run: run(name == "decode"), ["decode", "fused"],
                                             rounds)
                    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
                    ratio = statistics.median(round_ratios(times, "fused", "decode"))
                    print(f"| {len_q} | B{B} Hq{Hq} Hkv{Hkv} T{T} P{P} D{D} | {med['decode']:.2f} | "
                          f"{med['fused']:.2f} | {ratio:.2f}x |", flush=True)
    finally:
        decode.DECODE_MIN_ROWS, decode.DECODE_MIN_READERS = saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--len-q", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--threshold", action="store_true", help="only the decode path on / off at small batches")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: every variant in bfloat16 (results in *_bfloat16.md)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    dtype = getattr(torch, args.dtype)
    if args.threshold:
        return threshold(rounds)
    shapes = SHAPES[:1] + SHAPES[4:5] if args.quick else SHAPES
    lines = [f"# Decode step on the CPU: {cpu_model()}, {torch.get_num_threads()} threads", "",
             f"{args.dtype}, len_q={args.len_q}, torch {torch.__version__}, commit {git_commit()}, "
             f"{datetime.date.today()}, {rounds} rounds. Median ms; speed-up = median of per-round ratios "
             f"(variant / prefix_attn).", "",
             "| shape | prefix_attn ms | fused ms | sdpa expanded ms | sdpa concat ms | vs fused | vs expanded | "
             "vs concat | cache MiB (ours / expanded) |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        B, Hq, Hkv, T, P, D, N = shape
        q, k, v, pk, pv, ids = make(shape, args.len_q, dtype=dtype)
        calls = variants(q, k, v, pk, pv, ids, args.len_q)
        with torch.no_grad():
            want = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)),
                                              **({} if ids is None else {"prefix_ids": ids}))
            for name, fn in calls.items():  # float32: absolute; bfloat16: relative to the largest output
                err = (fn().double() - want).abs().max().item()
                limit = 1e-4 if dtype == torch.float32 else 3e-2 * want.abs().max().item()
                assert err < limit, f"{name} at {shape}: max error {err:.2e}"
            times = side_by_side(lambda name, calls=calls: calls[name], list(calls), rounds)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        ratio = {name: statistics.median(round_ratios(times, name, "prefix_attn")) for name in calls}
        label = f"B{B} Hq{Hq} Hkv{Hkv} T{T} P{P} D{D}" + (f" bank{N}" if N else "")
        lines.append(f"| {label} | {med['prefix_attn']:.2f} | {med['fused']:.2f} | {med['sdpa expanded']:.2f} | "
                     f"{med['sdpa concat']:.2f} | {ratio['fused']:.2f}x | {ratio['sdpa expanded']:.2f}x | "
                     f"{ratio['sdpa concat']:.2f}x | {cache_mib(shape, 'prefix_attn', q.element_size()):.0f} / "
                     f"{cache_mib(shape, 'sdpa expanded', q.element_size()):.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if not args.quick:
        suffix = "" if dtype == torch.float32 else f"_{args.dtype}"
        print(f"wrote {write_cpu_markdown(args.out, 'bench_decode_cpu', text, suffix)}")
    print(text)


if __name__ == "__main__":
    main()
