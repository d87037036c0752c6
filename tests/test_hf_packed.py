"""Packed batches (transformers' DataCollatorWithFlattening: one row, position_ids restarting at 0, no attention
mask) through prefix_attn.enable: per example the logits equal that example run alone with the prefix, and
PEFT's prefix model on that example alone; the prefix gradient is the sum over the examples."""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_transformers_integration import VOCAB, P, peft_and_ours, peft_prefix_grad  # noqa: E402

LENGTHS = [4, 7, 1, 5]


def packed_examples(seed=3):
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(3, VOCAB, (n,), generator=g) for n in LENGTHS]
    return examples, collate(examples)


def collate(examples, **flags):
    """DataCollatorWithFlattening's batch of the examples: position_ids, and what flags ask for on top."""
    collator = transformers.DataCollatorWithFlattening(return_position_ids=True, **flags)
    return collator([{"input_ids": e.tolist()} for e in examples])


def assert_logits_of_the_packing(model, full, batch):
    """The model on a collated batch with extra packing kwargs gives the logits of position_ids alone."""
    with torch.no_grad():
        got = model(**{k: v for k, v in full.items() if k != "labels"}).logits
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def example_loss_sum(logits, examples):
    """Sum over examples of each one's mean next-token loss, from logits of the examples one after another."""
    total, start = 0.0, 0
    for e in examples:
        if e.numel() > 1:
            total = total + torch.nn.functional.cross_entropy(logits[start:start + e.numel() - 1], e[1:])
        start += e.numel()
    return total


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_batch_equals_each_example_alone(kind):
    peft_model, ours, prefix = peft_and_ours(kind)
    examples, batch = packed_examples()
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    out = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    example_loss_sum(out.logits[0], examples).backward()
    got_grad = prefix.prefix_kv.grad.clone()
    start = 0
    peft_total = 0.0
    for e in examples:
        n = e.numel()
        alone = ours(input_ids=e[None]).logits[0]
        want = peft_model(input_ids=e[None]).logits[0]
        torch.testing.assert_close(out.logits[0, start:start + n], alone, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits[0, start:start + n], want, atol=2e-5, rtol=1e-5)
        if n > 1:
            peft_total = peft_total + torch.nn.functional.cross_entropy(want[:-1], e[1:])
        start += n
    peft_total.backward()
    torch.testing.assert_close(got_grad, peft_prefix_grad(peft_model, prefix), atol=1e-6, rtol=1e-4)


def test_packed_model_loss_matches_the_collator_labels():
    """The model's own loss on the collated batch (labels -100 at each example's first token) equals the
    token-weighted mean of the examples' losses, each run alone."""
    _, ours, _ = peft_and_ours("llama")
    examples, batch = packed_examples(seed=5)
    got = ours(**batch).loss
    losses, counts = [], []
    for e in examples:
        if e.numel() > 1:
            losses.append(ours(input_ids=e[None], labels=e[None]).loss * (e.numel() - 1))
            counts.append(e.numel() - 1)
    torch.testing.assert_close(got, sum(losses) / sum(counts), atol=1e-5, rtol=1e-5)


def test_trainer_with_flattening_collator(tmp_path):
    _, ours, prefix = peft_and_ours("gpt2")
    ours.train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, VOCAB, (int(n),), generator=g).tolist()}
            for n in torch.randint(2, 12, (16,), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                                          save_strategy="no", disable_tqdm=True)
    before = prefix.prefix_kv.detach().clone()
    trainer = transformers.Trainer(model=ours, args=args, train_dataset=data,
                                   data_collator=transformers.DataCollatorWithFlattening())
    trainer.train()
    assert (prefix.prefix_kv.detach() - before).abs().max() > 1e-4
    assert all(h["grad_norm"] > 0 for h in trainer.state.log_history if "grad_norm" in h)
    assert P == prefix.num_virtual_tokens


def test_flash_attention_kwargs_from_the_collator():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds cu_seq_lens_q/k and max_length_q/k, which
    Llama passes to its attention function: the same result as from position_ids alone."""
    _, ours, _ = peft_and_ours("llama")
    examples, batch = packed_examples()
    fa = collate(examples, return_flash_attn_kwargs=True)
    assert "cu_seq_lens_q" in fa
    assert_logits_of_the_packing(ours, fa, batch)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_seq_idx_from_the_collator_is_accepted(kind):
    """TRL's packing collators (and DataCollatorWithFlattening(return_seq_idx=True)) add seq_idx, each token's
    example index, beside position_ids / cu_seq_lens: accepted when it agrees, the logits those of the packing."""
    _, ours, _ = peft_and_ours(kind)
    examples, batch = packed_examples()
    full = collate(examples, return_seq_idx=True, return_flash_attn_kwargs=True)
    assert "seq_idx" in full
    assert_logits_of_the_packing(ours, full, batch)
    assert ours(**full).loss.isfinite()


def test_seq_idx_that_disagrees_is_refused_by_name():
    _, ours, _ = peft_and_ours("llama")
    examples, _ = packed_examples()
    full = collate(examples, return_seq_idx=True)
    wrong = full["seq_idx"].clone()
    wrong[0, 2] += 1  # a boundary where position_ids have none
    with pytest.raises(ValueError, match="seq_idx"), torch.no_grad():
        ours(input_ids=full["input_ids"], position_ids=full["position_ids"], seq_idx=wrong)
    with pytest.raises(ValueError, match="seq_idx"), torch.no_grad():  # several sequences, positions not restarting
        ours(input_ids=full["input_ids"], seq_idx=full["seq_idx"])
    with torch.no_grad():  # one example per row: one value per row is fine
        ours(input_ids=full["input_ids"][:, :4], seq_idx=torch.zeros(1, 4, dtype=torch.long))
