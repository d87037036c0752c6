"""Prefix tuning of a small GPT-2 with prefix_attn, on the CPU in a few minutes, without any download.

1. Pretrain a tiny GPT-2 (built from a config) on a synthetic language: counting sequences mod 20 with one of
   four rules (+1, -1, +2, -2) picked at random per sequence. Given only a start number, the stock model
   cannot know which rule to follow.
2. Freeze it and train only a prefix (per-layer K/V, ``prefix_attn.PrefixTuning``) on sequences of one rule
   (default: -2). The attention runs through ``prefix_attention`` on the stock ``GPT2LMHeadModel``.
3. Save the prefix, reload it onto a freshly loaded copy of the model, and generate from a batch of prompts of
   different lengths (left-padded): the model now counts the prefix's way.

    python examples/train_prefix_gpt2.py                 # seconds to minutes on 2 CPU cores
    python examples/train_prefix_gpt2.py --projection    # Li & Liang's MLP, materialised after training
    python examples/train_prefix_gpt2.py --hidden        # per-layer hidden states through the frozen W_k / W_v
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import prefix_attn

NUMBERS = 20  # tokens 0..19 are numbers
BOS, PAD = 20, 21
RULES = {"+1": 1, "-1": -1, "+2": 2, "-2": -2}


def sequences(batch: int, length: int, steps, generator) -> torch.Tensor:
    """[batch, 1 + length]: BOS then `length` numbers counting by a rule drawn per row from `steps`."""
    steps = torch.tensor(steps)
    step = steps[torch.randint(len(steps), (batch,), generator=generator)]
    start = torch.randint(NUMBERS, (batch,), generator=generator)
    body = (start[:, None] + step[:, None] * torch.arange(length)[None, :]) % NUMBERS
    return torch.cat([torch.full((batch, 1), BOS), body], dim=1)


def which_rule(numbers) -> str:
    diffs = {(b - a) % NUMBERS for a, b in zip(numbers, numbers[1:])}
    for name, step in RULES.items():
        if diffs == {step % NUMBERS}:
            return name
    return "mixed"


def show(tokens: torch.Tensor, prompt: torch.Tensor) -> str:
    numbers = [t for t in tokens.tolist() if t < NUMBERS]
    n = sum(1 for t in prompt.tolist() if t < NUMBERS)
    given, new = " ".join(map(str, numbers[:n])), " ".join(map(str, numbers[n:]))
    return f"[{given}] -> {new}   ({which_rule(numbers)})"


def left_padded_prompts():
    prompts = [[BOS, 7], [BOS, 12], [BOS, 3, 1], [BOS, 16]]  # the third already says "-2"
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, title: str):
    ids, mask = left_padded_prompts()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    print(title)
    for row, prompt in zip(out, ids):
        print("   ", show(row, prompt))
    return out


def train(model, params, batches, steps: int, lr: float, desc: str):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        x = batches()
        labels = x.clone()
        labels[:, :2] = -100  # BOS and the start number are random: score the counting only
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def pretrained_base(steps: int, gen, attn_pdrop: float = 0.0):
    """(model, losses): a tiny GPT-2 from a config, trained on the four-rule language; its attention dropout
    (also applied, inside the fused kernels, while the prefix trains) is ``attn_pdrop``, other dropouts 0."""
    config = GPT2Config(vocab_size=NUMBERS + 2, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        attn_pdrop=attn_pdrop, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS,
                        pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    model.train()
    losses = train(model, model.parameters(), lambda: sequences(64, 12, list(RULES.values()), gen), steps, 3e-3,
                   "pretrain base model")
    return model, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="prefix_example_out", help="where the model and the prefix are saved")
    ap.add_argument("--rule", default="-2", choices=sorted(RULES), help="what the prefix should teach")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="prefix training steps")
    ap.add_argument("--num-virtual-tokens", type=int, default=8)
    ap.add_argument("--projection", action="store_true", help="train through Li & Liang's MLP")
    ap.add_argument("--hidden", action="store_true",
                    help="parameterization='hidden': per-layer [P, hidden] rows through the model's frozen W_k/W_v")
    ap.add_argument("--lr", type=float, default=None, help="prefix learning rate (3e-2; 1e-3 with MLP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attn-pdrop", type=float, default=0.0,
                    help="GPT-2's attention dropout (stock configs use 0.1), applied in the kernels in training")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    # 1. a tiny GPT-2 trained on the four-rule language
    model, pre = pretrained_base(args.pretrain_steps, gen, args.attn_pdrop)
    print(f"base model loss {pre[0]:.3f} -> {pre[-1]:.3f} (the rule stays ambiguous until the second number: "
          f"ln(4)/10 = {torch.log(torch.tensor(4.0)).item() / 10:.3f} at best)")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(os.path.join(args.out, "base_model"))
    model.eval()
    generate(model, "stock model, greedy:")

    # 2. prefix tuning: only the prefix trains, the model is frozen by enable()
    prefix = prefix_attn.PrefixTuning(model.config, num_virtual_tokens=args.num_virtual_tokens,
                                      projection=args.projection, init="normal", init_std=0.02,
                                      parameterization="hidden" if args.hidden else None)
    prefix_attn.enable(model, prefix)
    model.train()
    trainable = sum(p.numel() for p in prefix.parameters())
    frozen = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("prefix_attn."))
    print(f"prefix: {prefix}; {trainable} trainable parameters, model ({frozen}) frozen")
    lr = args.lr or (1e-3 if args.projection else 3e-2)
    losses = train(model, prefix.parameters(), lambda: sequences(32, 12, [RULES[args.rule]], gen),
                   args.steps, lr, f"prefix tuning (rule {args.rule})")
    k = max(1, len(losses) // 10)
    print(f"prefix loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} "
          f"(mean of the first/last {k} steps)")
    model.eval()
    generate(model, f"with the prefix (rule {args.rule}), greedy:")

    # 3. save, reload onto a fresh copy of the model, generate
    if args.projection:
        prefix.materialize()  # drop the MLP: inference reads the K/V directly
    path = prefix.save(os.path.join(args.out, "prefix.safetensors"))
    print(f"saved {path} ({os.path.getsize(path)} bytes)")
    prefix_attn.disable(model)

    fresh = GPT2LMHeadModel.from_pretrained(os.path.join(args.out, "base_model")).eval()
    generate(fresh, "reloaded stock model, greedy:")
    reloaded = prefix_attn.PrefixTuning.load(path)
    prefix_attn.enable(fresh, reloaded)
    out = generate(fresh, "reloaded model + reloaded prefix, greedy:")
    hits = sum(which_rule([t for t in row.tolist() if t < NUMBERS]) == args.rule for row in out)
    print(f"{hits}/{len(out)} generations follow rule {args.rule}; total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
