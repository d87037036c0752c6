"""One prefix-tuning training step on mixed-length examples: a padded batch against the same examples packed
into one row (transformers' DataCollatorWithFlattening), tokens per second.

    python benchmarks/bench_packed.py [--rounds 7] [--examples 16] [--min-len 16] [--max-len 512] [--quick]

A small GPT-2 built from a config (no downloads), ``prefix_attn.enable`` with a P-slot prefix, float32; the
lengths are drawn uniformly from [min-len, max-len] (fixed seed). ``padded``: right-padded ``[examples,
longest]`` with an attention mask (every row sees the prefix, padding costs compute); ``packed``: one row of all
tokens, position_ids restarting per example (``prefix_attention_varlen`` inside). Both variants are timed once
per round (forward + backward + optimizer step, order rotated); medians, and the median of per-round ratios
next to the padding fraction. Also runs on a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import cpu_model, device_name, round_ratios, side_by_side, sync  # noqa: E402

import prefix_attn  # noqa: E402


def build(device, prefix_len: int, layers: int, width: int, heads: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=1000, n_positions=1024, n_embd=width, n_layer=layers, n_head=heads,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(device)
    prefix = prefix_attn.PrefixTuning(model.config, prefix_len)
    prefix_attn.enable(model, prefix)
    return model.train(), torch.optim.AdamW(prefix.parameters(), lr=1e-3)


def batches(lengths, device):
    import transformers

    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, 1000, (n,), generator=g) for n in lengths]
    longest = max(lengths)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : e.numel()], mask[i, : e.numel()] = e, 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    packed = transformers.DataCollatorWithFlattening()([{"input_ids": e.tolist()} for e in examples])
    move = {k: v.to(device) for k, v in padded.items()}, {k: v.to(device) for k, v in packed.items()}
    return move, 1.0 - sum(lengths) / (len(lengths) * longest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 7 (3 with --quick)")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--prefix", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="4 short examples, 2 layers, 3 rounds unless --rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.max_len, args.layers, args.width = 4, 48, 2, 64
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.examples,), generator=g).tolist()
    (padded, packed), pad_fraction = batches(lengths, device)
    model, opt = build(device, args.prefix, args.layers, args.width, args.heads)
    tokens = sum(lengths)

    def prepare(name):
        batch = padded if name == "padded" else packed

        def step():
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            sync(device)
        return step

    times = side_by_side(prepare, ["padded", "packed"], args.rounds, warmup=1)
    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = statistics.median(round_ratios(times, "padded", "packed"))
    print(f"# {device_name(device, cpu_model())}, torch {torch.__version__}, GPT-2 {args.layers} layers x "
          f"{args.width}, P={args.prefix}, float32, {args.examples} examples of {args.min_len}..{args.max_len} "
          f"tokens ({tokens} tokens), median of {args.rounds} rounds")
    print("| layout | step ms | tokens/s |")
    print("|---|---|---|")
    for name in ("padded", "packed"):
        print(f"| {name} | {med[name] * 1e3:.1f} | {tokens / med[name]:.0f} |")
    print(f"packed speed-up {ratio:.2f}x; padding fraction of the padded batch {pad_fraction:.2f} "
          f"(1 / (1 - fraction) = {1 / (1 - pad_fraction):.2f}x)")


if __name__ == "__main__":
    main()
