"""A toy BART "summariser": prefix tuning a frozen encoder-decoder (Li & Liang's BART setting), on the CPU.

    python examples/bart_summariser.py [--layout li_liang|peft] [--out DIR]

1. A tiny ``BartForConditionalGeneration`` (random init, no downloads) is trained on a toy language with three
   ways to shorten a sequence of tokens, picked at random per example and never named: its first 4 tokens, its
   last 4, or its "content words" (tokens >= CONTENT, in order, at most 4). From the source alone the model cannot
   tell which is wanted, so it settles for one of them.
2. The model is frozen and a prefix alone learns the "summary" rule (content words): ``layout="li_liang"`` (a
   prefix in the encoder's self-attention, the decoder's and the cross-attention, through Li & Liang's MLP
   reparameterisation) or ``"peft"`` (in the decoder's self-attention only, as PEFT's SEQ_2_SEQ_LM).
3. Greedy ``generate()`` is scored (exact match) before and after, the prefix is saved with ``save_pretrained``,
   and reloaded onto the stock base with the same score.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prefix_attn  # noqa: E402

VOCAB, SRC, KEEP, CONTENT = 40, 10, 4, 24
BOS, PAD, EOS = 0, 1, 2


def summaries(src: torch.Tensor, rule: int) -> torch.Tensor:
    """[N, SRC] -> [N, KEEP + 1] targets (PAD after EOS): 0 = head, 1 = tail, 2 = content words."""
    rows = []
    for s in src.tolist():
        keep = s[:KEEP] if rule == 0 else s[-KEEP:] if rule == 1 else [t for t in s if t >= CONTENT][:KEEP]
        rows.append(keep + [EOS] + [PAD] * (KEEP - len(keep)))
    return torch.tensor(rows)


def data(n: int, seed: int, rule=None):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (n, SRC), generator=g)
    rules = torch.randint(0, 3, (n,), generator=g) if rule is None else torch.full((n,), rule)
    tgt = torch.stack([summaries(src[i:i + 1], int(r))[0] for i, r in enumerate(rules)])
    return src, tgt


def train(model, params, src, tgt, steps: int, lr: float, seed: int) -> float:
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    labels = tgt.masked_fill(tgt == PAD, -100)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, src.shape[0], (64,), generator=g)
        loss = model(input_ids=src[i], labels=labels[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def exact_match(model, src, tgt) -> float:
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=src, max_new_tokens=KEEP + 1, do_sample=False, num_beams=1)[:, 1:]
    out = torch.nn.functional.pad(out, (0, KEEP + 1 - out.shape[1]), value=PAD)
    return (out == tgt).all(1).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="li_liang", choices=["li_liang", "peft"])
    parser.add_argument("--out", default=None, help="where to save the trained prefix (default: a temp dir)")
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--prefix-steps", type=int, default=600)
    parser.add_argument("--prefix", type=int, default=8, help="virtual tokens per layer")
    parser.add_argument("--lr", type=float, default=3e-3, help="the prefix's learning rate")
    args = parser.parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
                                  attention_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                                  decoder_start_token_id=BOS, forced_eos_token_id=None, forced_bos_token_id=None)
    base = transformers.BartForConditionalGeneration(cfg)
    src, tgt = data(4096, seed=1)
    loss = train(base, base.parameters(), src, tgt, args.base_steps, 3e-3, seed=1)
    print(f"base model trained on the three rules: loss {loss:.3f}")
    test_src, test_tgt = data(256, seed=2, rule=2)
    before = exact_match(base, test_src, test_tgt)
    print(f"stock model: summary exact match {before:.2f}")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    shape = prefix_attn.prefix_shape_from_config(cfg, layout=args.layout)
    model = prefix_attn.enable(base, prefix_attn.PrefixTuning(shape, args.prefix, projection=True), layout=args.layout)
    model.print_trainable_parameters()
    src, tgt = data(2048, seed=3, rule=2)
    loss = train(model, [p for p in model.parameters() if p.requires_grad], src, tgt, args.prefix_steps, args.lr,
                 seed=3)
    after = exact_match(model, test_src, test_tgt)
    print(f"prefix ({args.layout}) trained on the summary rule: loss {loss:.3f}, summary exact match {after:.2f}")

    out = args.out or tempfile.mkdtemp()
    model.save_pretrained(os.path.join(out, "summariser"))
    fresh = transformers.BartForConditionalGeneration(cfg)
    fresh.load_state_dict(base_state)  # the same stock base, untouched
    restored = prefix_attn.load_pretrained(os.path.join(out, "summariser"), model=fresh)
    same = exact_match(restored, test_src, test_tgt)
    print(f"reloaded onto the stock base: summary exact match {same:.2f}{' (identical)' if same == after else ''}")
    print(test_src[:3].tolist(), "->", restored.generate(input_ids=test_src[:3], max_new_tokens=KEEP + 1,
                                                           do_sample=False)[:, 1:].tolist())


if __name__ == "__main__":
    main()
