"""``python -m prefix_attn.demo``: run the op on this machine, check it against the float64 reference, and
time it against what prefix tuning does today (expand the prefix + concat + SDPA).

Works on a CPU-only machine (native CPU kernel if built, else the PyTorch reference) and on a GPU (Triton).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .ops import available_backends, prefix_attention
from .reference import prefix_attention_reference


def expand_concat_sdpa(q, k, v, prefix_k, prefix_v):
    """PEFT's layout: the prefix copied for every row, concatenated, SDPA with a bottom-right causal mask."""
    from torch.nn.attention.bias import causal_lower_right

    batch, num_prefix = q.shape[0], prefix_k.shape[1]
    keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    mask = causal_lower_right(q.shape[2], num_prefix + k.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _interleaved_ms(fns, rounds: int, sync):
    """{name: [ms per round]}: each round times every fn once, in turn, so that a busy machine slows all of
    them alike (a shared CPU's speed drifts by 2x between seconds)."""
    for fn in fns.values():  # warm-up
        fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--heads-kv", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=20)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name, reason in available_backends().items():
        print(f"backend {name:7s} {reason}")

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, P, D = args.batch, args.heads, args.heads_kv, args.seq, args.prefix, args.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(B, H, T, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    prefix_k, prefix_v = rnd(Hkv, P, D), rnd(Hkv, P, D)
    inputs = (q, k, v, prefix_k, prefix_v)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[-1, : T // 4] = False  # left-pad the last row

    out = prefix_attention(*inputs, attention_mask=mask)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = prefix_attention_reference(*ref_inputs, attention_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.double())
    print(f"\nshape B={B} Hq={H} Hkv={Hkv} T={T} P={P} D={D} {str(dtype)[6:]} on {device}; max abs error vs "
          f"float64 reference:")
    for name, got, want in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), (out,) + grads,
                               (ref,) + ref_grads):
        print(f"  {name:10s} {(got.double() - want).abs().max().item():.2e}")

    def fwd_bwd(fn):
        def run():
            o = fn(*inputs)
            torch.autograd.grad(o, inputs, dout)
        return run

    times = _interleaved_ms({"ours": fwd_bwd(lambda *a: prefix_attention(*a)), "base": fwd_bwd(expand_concat_sdpa)},
                            args.rounds, sync)
    ours, base = statistics.median(times["ours"]), statistics.median(times["base"])
    ratios = sorted(b / o for o, b in zip(times["ours"], times["base"]))  # per round: the same moment of the machine
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    print(f"\nforward+backward, {args.rounds} interleaved rounds (causal, no padding), median ms:")
    print(f"  prefix_attention             {ours:9.2f} ms")
    print(f"  expand + concat + SDPA       {base:9.2f} ms")
    print(f"  speed-up                     {statistics.median(ratios):9.2f}x  (per-round ratios: quartiles "
          f"{q1:.2f}-{q3:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
