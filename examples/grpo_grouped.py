"""GRPO on a small GPT-2 with grouped prompts: each prompt computed once for its G sampled completions.

1. Pretrain a tiny GPT-2 (built from a config, no download) on counting sequences mod 20 by one of four rules
   (+1, -1, +2, -2), picked at random per sequence: from one start number the model cannot know the rule.
2. GRPO: for each prompt (BOS and one or two numbers; two-number prompts count by -2, so prompts have different
   lengths and are left-padded, as TRL's are), sample G completions, reward each by the fraction of its numbers
   that continue by -2, normalise the rewards within the group (the advantages), and take a policy-gradient step
   on ``-mean(advantage * log p(token))`` over the completion tokens. The log-probs come from
   ``prefix_attn.grouped_forward(..., completion_only=True).completion_log_probs(...)``: each layer computes the
   prompt once and the completions read its K/V in place, where the stock batch would repeat each prompt G times.
3. At the first step the grouped log-probs are checked against the stock call on the concatenated batch.

    python examples/grpo_grouped.py                   # about a minute on 2 CPU cores
    python examples/grpo_grouped.py --prefix 8        # train only a prefix (prefix_attn.enable), base frozen
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import prefix_attn

NUMBERS = 20  # tokens 0..19 are numbers
BOS, PAD = 20, 21
TARGET = -2  # the rule GRPO rewards


def pretrain(steps: int, generator) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=22, n_positions=32, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS,
                                       pad_token_id=PAD))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rules = torch.tensor([1, -1, 2, -2])
    for _ in range(steps):
        step = rules[torch.randint(4, (64,), generator=generator)]
        start = torch.randint(NUMBERS, (64,), generator=generator)
        body = (start[:, None] + step[:, None] * torch.arange(10)[None, :]) % NUMBERS
        ids = torch.cat([torch.full((64, 1), BOS), body], 1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def prompts(n: int, generator):
    """[n, 3] left-padded prompts (BOS s, or BOS s s-2) and their mask."""
    start = torch.randint(NUMBERS, (n,), generator=generator)
    two = torch.rand(n, generator=generator) < 0.5
    ids = torch.stack([torch.full((n,), BOS), start, (start + TARGET) % NUMBERS], 1)
    ids[~two] = torch.stack([torch.full((int((~two).sum()),), PAD), torch.full((int((~two).sum()),), BOS),
                             start[~two]], 1)
    mask = torch.ones_like(ids)
    mask[~two, 0] = 0
    return ids, mask


def rewards(prompt_ids, completion_ids, group: int) -> torch.Tensor:
    """[N * G]: the fraction of each completion's numbers continuing its prompt by TARGET."""
    last = prompt_ids[:, -1].repeat_interleave(group)
    prev = torch.cat([last[:, None], completion_ids[:, :-1]], 1)
    return ((prev + TARGET) % NUMBERS == completion_ids).float().mean(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--prefix", type=int, default=0, help="train a prefix of this many virtual tokens only")
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model = pretrain(args.pretrain_steps, g)
    print(f"pretrained in {time.perf_counter() - t0:.0f} s")
    if args.prefix:  # the prefix's attention runs through prefix_attn's op, as grouped_forward needs
        prefix_attn.enable(model, prefix_attn.PrefixTuning(model.config, num_virtual_tokens=args.prefix))
    else:  # a stock model: its attention through prefix_attn's op (no prefix), for grouped_forward
        prefix_attn.enable_grouped(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr or (3e-2 if args.prefix else 1e-3))
    for step in range(args.steps):
        prompt, pmask = prompts(args.prompts, g)
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=pmask, do_sample=True, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, num_return_sequences=args.group, pad_token_id=PAD)
        completion = out[:, prompt.shape[1]:]
        cmask = torch.ones_like(completion)
        reward = rewards(prompt, completion, args.group)
        r = reward.view(-1, args.group)
        advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
        model.train()
        grouped = prefix_attn.grouped_forward(model, prompt, pmask, completion, cmask, args.group,
                                              completion_only=True)
        logp = grouped.completion_log_probs(completion)
        if step == 0:  # the stock call on the repeated batch, as TRL's GRPO computes the log-probs
            with torch.no_grad():
                ids = torch.cat([prompt.repeat_interleave(args.group, 0), completion], 1)
                mask = torch.cat([pmask.repeat_interleave(args.group, 0), cmask], 1)
                lc = completion.shape[1]
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=lc + 1).logits[:, :-1]
                stock = torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None])[..., 0]
            print(f"grouped log-probs vs the stock concatenated batch: max |diff| "
                  f"{(logp.detach() - stock).abs().max().item():.1e}")
        loss = -(logp * advantages[:, None] * cmask).sum() / cmask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  mean reward {reward.mean().item():.3f}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
