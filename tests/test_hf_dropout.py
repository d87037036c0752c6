"""Attention dropout through Hugging Face models: the model's own probability reaches the kernels in training
mode (none in eval mode), and GPT-2 with attn_pdrop=0.1 trains like PEFT's prefix tuning, statistically (the
masks cannot match PEFT's random numbers)."""

import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_transformers_integration import P, padded_batch, peft_and_ours, tiny_model  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402
from prefix_attn.integrations import attention as hf_attention  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.mark.parametrize("kind,config", [("gpt2", {"attn_pdrop": 0.1}), ("llama", {"attention_dropout": 0.2}),
                                         ("qwen2", {"attention_dropout": 0.3})])
def test_model_dropout_probability_reaches_the_op(kind, config, monkeypatch):
    seen = []
    real = hf_attention.prefix_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "prefix_attention", spy)
    model = tiny_model(kind, **config)
    prefix = PrefixTuning(model.config, P)
    prefix_attn.enable(model, prefix)
    ids, mask, labels = padded_batch()
    p = next(iter(config.values()))
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert seen == [p, p]  # both layers
    seen.clear()
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    assert seen == [0.0, 0.0]
    seen.clear()
    prefix_attn.enable(model, prefix, ignore_attention_dropout=True)  # the opt-out
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen == [0.0, 0.0]


def test_training_mode_differs_and_eval_mode_matches_peft():
    peft_model, ours, _ = peft_and_ours("gpt2", attn_pdrop=0.1)
    ids, mask, _ = padded_batch()
    want = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, want, atol=2e-5, rtol=2e-5)
    ours.train()
    torch.manual_seed(0)
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = ours(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(0)
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, a)  # reproducible by torch.manual_seed
    assert not torch.equal(a, b) and not torch.allclose(a, want, atol=1e-3)


def _losses(model, opt, ids, mask, labels, steps):
    out = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(loss.item())
    return torch.tensor(out, dtype=torch.float64)


def test_gpt2_attention_dropout_trains_like_peft():
    """GPT-2 (attn_pdrop=0.1, no other dropout), the same prefix and data, 30 AdamW steps each.

    Dropout is the only source of noise, so (1) at the initial weights the training-mode loss over 40 draws has
    the same mean and spread as PEFT's, (2) the step-to-step jitter of the training curve matches PEFT's and is
    several times the jitter without dropout, and (3) the curves' means agree within their noise."""
    peft_model, ours, prefix = peft_and_ours("gpt2", attn_pdrop=0.1)
    peft_model.train()
    ours.train()
    ids, mask, labels = padded_batch(batch=8, length=16)
    torch.manual_seed(0)
    with torch.no_grad():
        draws_a = _losses(peft_model, None, ids, mask, labels, 40)
        draws_b = _losses(ours, None, ids, mask, labels, 40)
    se = math.sqrt(draws_a.var() / 40 + draws_b.var() / 40)
    assert abs(draws_a.mean() - draws_b.mean()) < 5 * se, (draws_a.mean(), draws_b.mean(), se)
    assert 0.6 < draws_b.std() / draws_a.std() < 1.6, (draws_a.std(), draws_b.std())

    start = prefix.prefix_kv.detach().clone()
    opt_a = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW(prefix.parameters(), lr=1e-2)
    curve_a = _losses(peft_model, opt_a, ids, mask, labels, 30)
    curve_b = _losses(ours, opt_b, ids, mask, labels, 30)
    jitter_a, jitter_b = curve_a.diff().std(), curve_b.diff().std()
    assert 0.6 < jitter_b / jitter_a < 1.6, (jitter_a, jitter_b)
    d = curve_a - curve_b
    assert abs(d.mean()) < 5 * d.std() / math.sqrt(len(d)), (d.mean(), d.std())

    with torch.no_grad():  # the same run without attention dropout: its curve is far smoother
        prefix.prefix_kv.copy_(start)
    prefix_attn.enable(ours, prefix, ignore_attention_dropout=True)
    curve_c = _losses(ours, torch.optim.AdamW(prefix.parameters(), lr=1e-2), ids, mask, labels, 30)
    assert jitter_b > 3 * curve_c.diff().std(), (jitter_b, curve_c.diff().std())
