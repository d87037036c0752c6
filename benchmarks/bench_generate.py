"""``generate()`` throughput with a long prefix shared by a batch: prefix_attn against PEFT's prefix tuning, CPU.

    python benchmarks/bench_generate.py            # GPT-2 and Llama, B=32, P=1024; results in benchmarks/results/
    python benchmarks/bench_generate.py --quick

Small models built from configs (4 layers, width 256; no downloads). Both generate greedily from the same
left-padded prompts, with the same prefix (``PrefixTuning.from_peft``): PEFT's cache holds the prefix copied into
every row; prefix_attn's holds the text only and its decode path reads the prefix once per step for all rows. The
tokens are compared first (they must be equal). Tokens/s = batch * new tokens / median seconds of the
``generate()`` call, over interleaved rounds. peft 0.21's ``generate()`` drops its prefix from transformers 5.24
on: with that pair PEFT's row is not run (the results say so); peft 0.22 keeps it on every tested release.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cpu_model, git_commit, side_by_side, write_cpu_markdown  # noqa: E402

import prefix_attn  # noqa: E402


def build(family: str, max_positions: int):
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=max_positions,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=max_positions,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    import peft
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    rounds = 2 if args.quick else args.rounds
    release = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    peft_works = release < (5, 24) or tuple(int(x) for x in peft.__version__.split(".")[:2]) >= (0, 22)
    lines = [f"# generate() with a shared prefix: {cpu_model()}, {torch.get_num_threads()} threads", "",
             f"float32, batch {args.batch}, P={args.prefix}, prompts {args.prompt} tokens (left-padded), "
             f"{args.new} new tokens, greedy; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, commit {git_commit()}, {datetime.date.today()}, {rounds} rounds.", "",
             "| model | prefix_attn tok/s | PEFT tok/s | speed-up | same tokens |", "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    for b in range(args.batch):
        mask[b, : b % 5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    for family in ("gpt2", "llama"):
        base = build(family, args.prefix + args.prompt + args.new + 8)
        pm = peft.get_peft_model(build(family, args.prefix + args.prompt + args.new + 8),
                                 peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix))
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.normal_(0.0, 0.5)
        pm.eval()
        ours = prefix_attn.enable(base, prefix_attn.PrefixTuning.from_peft(pm))
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                  do_sample=False, pad_token_id=0)
        calls = {"prefix_attn": lambda ours=ours, kw=kw: ours.generate(**kw)}
        if peft_works:
            calls["peft"] = lambda pm=pm, kw=kw: pm.generate(**kw)
        with torch.no_grad():
            outs = {name: fn() for name, fn in calls.items()}
            same = "yes" if peft_works and torch.equal(outs["prefix_attn"], outs["peft"]) else (
                "no" if peft_works else "-")
            times = side_by_side(lambda name, calls=calls: calls[name], list(calls), rounds)
        tps = {name: args.batch * args.new / statistics.median(t) for name, t in times.items()}
        if peft_works:
            speed = statistics.median(p / o for o, p in zip(times["prefix_attn"], times["peft"]))
            row = f"| {family} | {tps['prefix_attn']:.0f} | {tps['peft']:.0f} | {speed:.2f}x | {same} |"
        else:
            row = (f"| {family} | {tps['prefix_attn']:.0f} | not run (peft {peft.__version__}'s generate drops its "
                   f"prefix on transformers {transformers.__version__}) | - | - |")
        lines.append(row)
        print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if not args.quick:
        print(f"wrote {write_cpu_markdown(args.out, 'bench_generate_cpu', text, f'_tf{transformers.__version__}')}")
    print(text)


if __name__ == "__main__":
    main()
