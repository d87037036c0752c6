"""Two prefixes, one frozen model, one mixed batch: ``prefix_attn.PrefixBank`` on a small GPT-2, on the CPU.

The synthetic counting language of ``train_prefix_gpt2.py`` (tokens 0..19 count mod 20 by a rule picked per
sequence). A tiny GPT-2 is pretrained on all four rules and frozen; from a single start number it cannot know
which way to count. Two tasks ask different things of the same kind of prompt:

* ``count_up``: continue upward (+1), with a prefix of 4 virtual tokens;
* ``count_down``: continue downward (-1), with a prefix of 8 virtual tokens.

Both prefixes go in one ``PrefixBank`` and train together: every batch holds rows of both tasks and
``prefix_ids`` names each row's entry. The model is saved with ``save_pretrained`` (the bank: ``model.safetensors``
with its tensors + ``prefix_bank/``), reloaded onto the base with ``prefix_attn.load_pretrained``, and generates
from a mixed, left-padded batch in which the same prompt counts up or down depending on its row's prefix.

    python examples/train_prefix_bank.py                 # seconds on 2 CPU cores; no downloads
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm.auto import tqdm
from train_prefix_gpt2 import BOS, NUMBERS, PAD, RULES, pretrained_base, sequences, which_rule
from transformers import GPT2LMHeadModel

import prefix_attn

TASKS = {"count_up": "+1", "count_down": "-1"}  # bank entry -> the rule its rows follow
SHARED = [[7], [12], [0], [19]]  # asked of both tasks: the prefix alone decides the direction
PROMPTS = {"count_up": SHARED + [[3, 4], [15, 16, 17]], "count_down": SHARED + [[9, 8], [2, 1, 0]]}


def mixed_batch(per_task: int, gen):
    """([2 * per_task, 13] sequences, their entry names), the two tasks' rows shuffled together."""
    x = torch.cat([sequences(per_task, 12, [RULES[rule]], gen) for rule in TASKS.values()])
    names = [name for name in TASKS for _ in range(per_task)]
    order = torch.randperm(len(names), generator=gen).tolist()
    return x[order], [names[i] for i in order]


def left_padded_prompts():
    """The prompts of both tasks, rows alternating between the tasks, left-padded to one width."""
    rows = [(name, [BOS] + p) for pair in zip(*PROMPTS.values()) for name, p in zip(TASKS, pair)]
    width = max(len(p) for _, p in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (_, p) in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask, [name for name, _ in rows]


@torch.no_grad()
def generate(model, title: str, bank=None):
    """Greedy continuations of the mixed batch; prints them per task and returns {task: rows following it}."""
    ids, mask, names = left_padded_prompts()
    kw = {} if bank is None else {"prefix_ids": bank.ids(names)}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD, **kw)
    print(title)
    hits = {}
    for task, rule in TASKS.items():
        print(f"  {task} (rule {rule}):")
        hits[task] = 0
        for row, prompt, name in zip(out, ids, names):
            if name != task:
                continue
            numbers = [t for t in row.tolist() if t < NUMBERS]
            n = sum(1 for t in prompt.tolist() if t < NUMBERS)
            got = which_rule(numbers)
            hits[task] += got == rule
            print(f"    [{' '.join(map(str, numbers[:n]))}] -> {' '.join(map(str, numbers[n:]))}   ({got})")
    return out, hits


def summary(hits) -> str:
    return ", ".join(f"{task} {h}/{len(PROMPTS[task])}" for task, h in hits.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="prefix_bank_out", help="where the bank-enabled model is saved")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150, help="bank training steps (both tasks in every batch)")
    ap.add_argument("--per-task", type=int, default=16, help="rows of each task per batch")
    ap.add_argument("--tokens", type=int, nargs=2, default=[4, 8], metavar=("UP", "DOWN"),
                    help="num_virtual_tokens of the count_up and count_down prefixes")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--min-hits", type=int, default=5, help="exit with status 1 if fewer reloaded generations "
                    "of a task follow its rule (the stock model cannot reach 5 for both: the shared prompts "
                    "go one way)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    # 1. a tiny GPT-2 trained on the four-rule language (as in train_prefix_gpt2.py)
    model, pre = pretrained_base(args.pretrain_steps, gen)
    print(f"base model loss {pre[0]:.3f} -> {pre[-1]:.3f}")
    model.eval()
    _, hits = generate(model, "stock model (no prefix), greedy:")
    print(f"stock model follows the task's rule: {summary(hits)}")
    base_dir = os.path.join(args.out, "base_model")
    model.save_pretrained(base_dir)  # the frozen base, saved once: checkpoints of the enabled model hold the bank

    # 2. two prefixes of different lengths in one bank; enable() freezes the model
    prefixes = {name: prefix_attn.PrefixTuning(model.config, num_virtual_tokens=p, init="normal", init_std=0.02)
                for name, p in zip(TASKS, args.tokens)}
    bank = prefix_attn.PrefixBank(prefixes)
    prefix_attn.enable(model, bank)
    assert all(bank[name] is prefixes[name] for name in TASKS) and bank[0] is prefixes["count_up"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    print(f"bank: {bank.extra_repr()}; trainable: {trainable}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    bar = tqdm(range(args.steps), desc="train the bank (mixed batches)", unit="step")
    for _ in bar:
        x, names = mixed_batch(args.per_task, gen)
        labels = x.clone()
        labels[:, :2] = -100  # BOS and the start number are random: score the counting only
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels, prefix_ids=bank.ids(names)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    k = max(1, len(losses) // 10)
    print(f"bank loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} (mean of the first/last {k} steps)")
    model.eval()
    trained, _ = generate(model, "with the bank, greedy:", bank)

    # 3. save (the bank's tensors + prefix_bank/), reload onto the base model, generate the mixed batch again
    path = os.path.join(args.out, "bank_model")
    model.save_pretrained(path)
    print(f"saved {path}: {sorted(os.listdir(path))}, prefix_bank/: "
          f"{sorted(os.listdir(os.path.join(path, 'prefix_bank')))}")
    reloaded = prefix_attn.load_pretrained(path, model=GPT2LMHeadModel.from_pretrained(base_dir)).eval()
    again = reloaded.prefix_attn
    print(f"reloaded bank: {again.extra_repr()}")
    out, hits = generate(reloaded, "reloaded model + reloaded bank, greedy:", again)
    same = torch.equal(out, trained)
    print(f"reloaded generations {'identical to' if same else 'DIFFER from'} the trained model's")
    print(f"generations following their task's rule: {summary(hits)}; total time {time.time() - t0:.0f}s")
    if not same or min(hits.values()) < args.min_hits:
        sys.exit(f"FAILED: fewer than {args.min_hits} generations of a task follow its rule, or the reloaded "
                 f"model generates differently")


if __name__ == "__main__":
    main()
