"""Prefix tuning with ``transformers.Trainer``: nothing but ``Trainer(model=enabled_model, args, train_dataset)``.

The same synthetic counting language as ``train_prefix_gpt2.py`` (tokens 0..19 count mod 20 by a rule picked
per sequence). A tiny GPT-2 is pretrained on all four rules, frozen, and a prefix is trained with Trainer on
one rule. After ``prefix_attn.enable(model, prefix)`` the prefix is the submodule ``model.prefix_attn``, so
Trainer's optimizer, scheduler, gradient clipping, ``grad_norm`` logging and checkpoints see it. The run saves
checkpoints, resumes from the first one to the same final prefix, saves the model, and reloads it with
``prefix_attn.load_pretrained``.

    python examples/train_prefix_trainer.py            # about a minute on 2 CPU cores; no downloads
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from train_prefix_gpt2 import BOS, NUMBERS, PAD, RULES, generate, sequences, train, which_rule
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import prefix_attn


class CountingRows(torch.utils.data.Dataset):
    """Sequences of one rule, scored on the counting only (BOS and the random start are not labels)."""

    def __init__(self, n: int, rule: str, seed: int):
        self.ids = sequences(n, 12, [RULES[rule]], torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        labels = ids.clone()
        labels[:2] = -100
        return {"input_ids": ids, "labels": labels}


def base_model(seed: int, steps: int):
    config = GPT2Config(vocab_size=NUMBERS + 2, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS,
                        pad_token_id=PAD)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    train(model, model.parameters(), lambda: sequences(64, 12, list(RULES.values()), gen), steps, 3e-3,
          "pretrain base model")
    return model.eval()


def trainer_args(out: str, steps: int, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=out, per_device_train_batch_size=32, max_steps=steps, learning_rate=3e-2,
                             lr_scheduler_type="linear", warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0,
                             logging_steps=max(1, steps // 10), save_steps=steps // 2, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="prefix_trainer_out")
    ap.add_argument("--rule", default="-2", choices=sorted(RULES))
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--num-virtual-tokens", type=int, default=8)
    ap.add_argument("--projection", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    base = base_model(args.seed, args.pretrain_steps)
    base_dir = os.path.join(args.out, "base_model")
    base.save_pretrained(base_dir)
    data = CountingRows(32 * args.steps, args.rule, args.seed + 1)

    def fresh_enabled(seed):
        model = GPT2LMHeadModel.from_pretrained(base_dir)
        torch.manual_seed(seed)
        prefix = prefix_attn.PrefixTuning(model.config, args.num_virtual_tokens, projection=args.projection)
        return prefix_attn.enable(model, prefix)

    # 1. train: the enabled model is all Trainer needs
    model = fresh_enabled(args.seed)
    print("trainable:", [n for n, p in model.named_parameters() if p.requires_grad])
    trainer = Trainer(model=model, args=trainer_args(os.path.join(args.out, "run"), args.steps), train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    print(f"loss {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f}; grad_norm {logs[0]['grad_norm']:.3f} -> "
          f"{logs[-1]['grad_norm']:.3f}")
    final = {k: v.clone() for k, v in model.prefix_attn.state_dict().items()}

    # 2. resume from the half-way checkpoint: same final prefix as the uninterrupted run
    half = os.path.join(args.out, "run", f"checkpoint-{args.steps // 2}")
    resumed = fresh_enabled(args.seed + 100)
    again = Trainer(model=resumed, args=trainer_args(os.path.join(args.out, "resumed"), args.steps),
                    train_dataset=data)
    again.train(resume_from_checkpoint=half)
    same = all(torch.equal(final[k], v) for k, v in resumed.prefix_attn.state_dict().items())
    print(f"resumed from {half}: final prefix {'bitwise equal to' if same else 'DIFFERS from'} the straight run")

    # 3. save, reload (stock checkpoint + prefix.safetensors), generate
    final_dir = os.path.join(args.out, "final")
    trainer.save_model(final_dir)
    print("saved:", sorted(os.listdir(final_dir)))
    reloaded = prefix_attn.load_pretrained(final_dir, GPT2LMHeadModel).eval()
    out = generate(reloaded, f"reloaded model + prefix (rule {args.rule}), greedy:")
    hits = sum(which_rule([t for t in row.tolist() if t < NUMBERS]) == args.rule for row in out)
    print(f"{hits}/{len(out)} generations follow rule {args.rule}; total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
