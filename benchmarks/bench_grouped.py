"""Grouped-prompt training step (GRPO groups): ``prefix_attn.grouped_forward`` against the stock call on the
concatenated batch (every prompt repeated G times), forward + backward of a GRPO-style loss, and peak memory. CPU.

    python benchmarks/bench_grouped.py               # GPT-2, 4 layers, width 256, 2 prompts x 512, 8 x 64
    python benchmarks/bench_grouped.py --quick

The base weights are trained (full fine-tuning), dropouts 0. Loss: the completions' per-token log-probs times
group-normalised advantages (random rewards), averaged over the completion tokens, as GRPO's (the log-probs as
TRL's ``selective_log_softmax``: chosen logit minus log-sum-exp; ``GroupedOutput.completion_log_probs``). Two logits
settings: ``all`` (the stock call's full logits; grouped_forward also computes the prompts' once) and
``completions`` (TRL's GRPO: the stock call keeps the last Lc + 1 positions with ``logits_to_keep``,
grouped_forward runs with ``completion_only=True``). Both variants' losses and gradients are compared first (they
must agree). Times are medians over interleaved rounds; peak memory is the resident-set growth of one step, each
variant in a fresh process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cpu_model, git_commit, side_by_side, write_cpu_markdown  # noqa: E402

import prefix_attn  # noqa: E402


def build(args):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                                  vocab_size=args.vocab, n_positions=args.prompt_len + args.completion_len,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).train()


def make_batch(args):
    """TRL's GRPO layout: prompts left-padded (some shorter), completions right-padded (some shorter)."""
    g = torch.Generator().manual_seed(1)
    n, k, lp, lc = args.prompts, args.group, args.prompt_len, args.completion_len
    prompt = torch.randint(0, args.vocab, (n, lp), generator=g)
    pmask = torch.ones(n, lp, dtype=torch.long)
    for i in range(n):
        pmask[i, : (i * 37) % (lp // 4 + 1)] = 0
    completion = torch.randint(0, args.vocab, (n * k, lc), generator=g)
    cmask = torch.ones(n * k, lc, dtype=torch.long)
    for r in range(n * k):
        cmask[r, lc - (r * 7) % (lc // 2 + 1):] = 0
    rewards = torch.rand(n, k, generator=g)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
    return prompt, pmask, completion, cmask, advantages


def grpo_loss(logp, cmask, advantages):
    """logp ``[N * G, Lc]``: the completion tokens' log-probs -> -mean(advantage * log p(token))."""
    m = cmask.to(logp.dtype)
    return -(logp * advantages[:, None] * m).sum() / m.sum()


def step_fn(model, batch, name, logits_mode, group):
    prompt, pmask, completion, cmask, advantages = batch
    lc = completion.shape[1]

    def stock():  # TRL's GRPO: logits_to_keep = Lc + 1, the last one dropped
        ids = torch.cat([prompt.repeat_interleave(group, 0), completion], 1)
        mask = torch.cat([pmask.repeat_interleave(group, 0), cmask], 1)
        keep = dict(logits_to_keep=lc + 1) if logits_mode == "completions" else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **keep).logits[:, -lc - 1:-1].float()
        # TRL's selective_log_softmax (float32): the chosen logit minus the row's log-sum-exp
        logp = logits.gather(-1, completion[..., None])[..., 0] - torch.logsumexp(logits, -1)
        loss = grpo_loss(logp, cmask, advantages)
        loss.backward()
        return loss

    def grouped():
        out = prefix_attn.grouped_forward(model, prompt, pmask, completion, cmask, group,
                                          completion_only=logits_mode == "completions")
        loss = grpo_loss(out.completion_log_probs(completion), cmask, advantages)
        loss.backward()
        return loss

    return stock if name == "stock" else grouped


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args):
    """One step of one variant in this (fresh) process: the growth of the resident set's peak over the step, in
    MiB, printed as JSON (Linux: the peak, VmHWM, is reset through /proc/self/clear_refs first; getrusage's peak
    is inherited from the parent process)."""
    model = build(args)
    if args.memory_of == "grouped":
        prefix_attn.enable_grouped(model)
    batch = make_batch(args)
    fn = step_fn(model, batch, args.memory_of, args.logits, args.group)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    fn()
    print(json.dumps({"peak_growth_mib": _status_mib("VmHWM") - before}))


def peak_memory(args, name, logits_mode) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", name, "--logits", logits_mode,
           "--prompts", str(args.prompts), "--group", str(args.group), "--prompt-len", str(args.prompt_len),
           "--completion-len", str(args.completion_len), "--layers", str(args.layers), "--width", str(args.width),
           "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_growth_mib"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--logits", choices=["all", "completions", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds, nothing written")
    parser.add_argument("--memory-of", choices=["stock", "grouped"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if args.memory_of:
        return memory_child(args)
    if args.quick:
        args.prompt_len, args.completion_len, args.vocab, args.layers = 64, 16, 512, 2
    rounds = 2 if args.quick else args.rounds
    modes = ["all", "completions"] if args.logits == "both" else [args.logits]
    n, k, lp, lc = args.prompts, args.group, args.prompt_len, args.completion_len
    lines = [f"# Grouped-prompt training step: {cpu_model()}, {torch.get_num_threads()} threads", "",
             f"float32, GPT-2 {args.layers} layers width {args.width} vocab {args.vocab}, {n} prompts x {lp} tokens "
             f"(left-padded), {k} completions x {lc} tokens each (right-padded); forward + backward of a GRPO loss, "
             f"all weights trained; torch {torch.__version__}, transformers {transformers.__version__}, commit "
             f"{git_commit()}, {datetime.date.today()}, {rounds} interleaved rounds (median).", "",
             "| logits | stock ms | grouped ms | speed-up | peak MiB stock | peak MiB grouped | loss/grad agree |",
             "|---|---|---|---|---|---|---|"]
    models = {"stock": build(args), "grouped": prefix_attn.enable_grouped(build(args))}  # the same weights
    batch = make_batch(args)
    for mode in modes:
        calls = {name: step_fn(models[name], batch, name, mode, k) for name in ("stock", "grouped")}
        got = {}
        for name, fn in calls.items():  # agreement first
            models[name].zero_grad(set_to_none=True)
            loss = fn()
            got[name] = (loss.item(), {p: w.grad.clone() for p, w in models[name].named_parameters()})
            models[name].zero_grad(set_to_none=True)
        loss_err = abs(got["stock"][0] - got["grouped"][0]) / max(abs(got["stock"][0]), 1e-30)
        grad_err = max(((got["stock"][1][p] - got["grouped"][1][p]).abs().max()
                        / got["stock"][1][p].abs().max().clamp_min(1e-30)).item() for p in got["stock"][1])
        agree = "yes" if loss_err < 1e-4 and grad_err < 1e-3 else "NO"
        del got

        def prepare(name, calls=calls):
            models[name].zero_grad(set_to_none=True)
            return calls[name]

        times = side_by_side(prepare, list(calls), rounds)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        speed = statistics.median(s / g for s, g in zip(times["stock"], times["grouped"]))
        mem = {name: peak_memory(args, name, mode) for name in calls} if not args.quick else {"stock": 0, "grouped": 0}
        row = (f"| {mode} | {med['stock']:.0f} | {med['grouped']:.0f} | {speed:.2f}x | {mem['stock']:.0f} | "
               f"{mem['grouped']:.0f} | {agree} (loss {loss_err:.1e}, grads {grad_err:.1e}) |")
        lines.append(row)
        print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if not args.quick:
        suffix = "" if args.vocab == 50257 else f"_vocab{args.vocab}"
        print(f"wrote {write_cpu_markdown(args.out, 'bench_grouped_cpu', text, suffix)}")
    print(text)


if __name__ == "__main__":
    main()
