"""prefix_attn.enable on stock transformers decoders against PEFT's prefix tuning with the same prefix values.

Tiny random models built from configs (no hub access), float32 on the CPU. Run directly while debugging:
``python tests/test_transformers_integration.py``.
"""

import copy
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402
from prefix_attn.integrations import transformers as hf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_versions import NEW_CACHE, cache_out, greedy_without_cache  # noqa: E402

VOCAB = 101
P = 5
ATOL = 2e-5  # float32 logits of a 2-layer model; observed differences are ~1e-7

warnings.filterwarnings("ignore", category=UserWarning)


def tiny_model(kind: str, **overrides):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = dict(vocab_size=VOCAB, n_positions=96, n_embd=48, n_layer=2, n_head=4, attn_pdrop=0.0,
                   resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        cfg.update(overrides)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96, bos_token_id=1,
                  eos_token_id=2)
    common.update(overrides)
    if kind == "llama":  # GQA 6:2, head_dim 8
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "mistral":  # sliding window longer than the test sequences: mask goes through the general path
        common.setdefault("sliding_window", 64)
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    if kind == "qwen2":  # q/k/v biases, GQA
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    raise ValueError(kind)


def peft_and_ours(kind: str, projection: bool = False, **overrides):
    """(peft_model, our_model, prefix): the same weights and prefix values, both in eval mode."""
    base = tiny_model(kind, **overrides).eval()
    ours = copy.deepcopy(base)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection)
    peft_model = peft.get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.normal_(0.0, 0.5)
    prefix = PrefixTuning.from_peft(peft_model)
    prefix_attn.enable(ours, prefix)
    peft_model.eval()
    return peft_model, ours, prefix


def padded_batch(batch=3, length=11, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def peft_prefix_grad(peft_model, prefix):
    """PEFT's prefix gradient in our [L, 2, Hkv, P, D] layout."""
    g = peft_model.prompt_encoder["default"].embedding.weight.grad
    return PrefixTuning._kv_from_peft_embeddings(g, prefix.shape, P)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2"])
def test_forward_backward_match_peft(kind):
    peft_model, ours, prefix = peft_and_ours(kind)
    ids, mask, labels = padded_batch()
    a = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=1e-5)  # every position, padded ones too
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
    a.loss.backward()
    b.loss.backward()
    expected = peft_prefix_grad(peft_model, prefix)
    torch.testing.assert_close(prefix.prefix_kv.grad, expected, atol=1e-6, rtol=1e-4)
    frozen = [p for n, p in ours.named_parameters() if not n.startswith("prefix_attn.")]
    assert all(p.grad is None and not p.requires_grad for p in frozen), "model weights must stay frozen"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_position_ids_given_match_peft(kind):
    peft_model, ours, _ = peft_and_ours(kind)
    ids, mask, _ = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    b = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-5)


def test_projection_matches_peft_and_materializes():
    peft_model, ours, prefix = peft_and_ours("gpt2", projection=True)
    assert prefix.projection
    ids, mask, labels = padded_batch()
    a = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    enc = peft_model.prompt_encoder["default"]
    for mine, theirs in [(prefix.embedding.weight, enc.embedding.weight),
                         (prefix.transform[0].weight, enc.transform[0].weight),
                         (prefix.transform[2].bias, enc.transform[2].bias)]:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-4)
    prefix.materialize()  # drop the MLP: same outputs from the stored K/V
    assert not prefix.projection and not hasattr(prefix, "transform")
    with torch.no_grad():
        c = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(c, a.logits.detach(), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_training_curves_match_peft(kind):
    peft_model, ours, prefix = peft_and_ours(kind)
    peft_model.train()
    ours.train()
    opt_a = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW(prefix.parameters(), lr=1e-2)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == prefix.prefix_kv.numel()
    losses_a, losses_b = [], []
    ids, mask, labels = padded_batch()
    for _ in range(5):
        for model, opt, losses in ((peft_model, opt_a, losses_a), (ours, opt_b, losses_b)):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_a[-1] < losses_a[0]
    torch.testing.assert_close(torch.tensor(losses_b), torch.tensor(losses_a), atol=1e-5, rtol=1e-5)
    flat = peft_model.prompt_encoder["default"].embedding.weight.detach()
    expected = PrefixTuning._kv_from_peft_embeddings(flat, prefix.shape, P)
    torch.testing.assert_close(prefix.prefix_kv.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gradient_checkpointing_same_gradients(kind):
    _, ours, prefix = peft_and_ours(kind)
    ours.train()
    ids, mask, labels = padded_batch()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = prefix.prefix_kv.grad.clone()
    prefix.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.gradient_checkpointing_enable()
    assert ours.base_model.gradient_checkpointing or any(getattr(m, "gradient_checkpointing", False)
                                                         for m in ours.modules())
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    torch.testing.assert_close(prefix.prefix_kv.grad, reference, atol=1e-7, rtol=1e-6)


def test_gradient_checkpointing_with_projection():
    _, ours, prefix = peft_and_ours("llama", projection=True)
    ours.train()
    ids, mask, labels = padded_batch()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = [p.grad.clone() for p in prefix.parameters()]
    prefix.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.gradient_checkpointing_enable()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for p, ref in zip(prefix.parameters(), reference):
        torch.testing.assert_close(p.grad, ref, atol=1e-7, rtol=1e-6)


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_greedy_matches_peft_left_padded(kind):
    peft_model, ours, _ = peft_and_ours(kind)
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    b = ours.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    with torch.no_grad():  # from 5.24 PEFT's generate drops its prefix: decoding without a cache is the oracle
        a = (greedy_without_cache(ours, ids, mask, 10) if NEW_CACHE else
             peft_model.generate(input_ids=ids, attention_mask=mask, **kw))
    assert torch.equal(b.sequences, a)
    # the prefix never enters the KV cache: it holds the text only
    assert cache_out(b).get_seq_length() == b.sequences.shape[1] - 1


def _oracle_generate(peft_model, ours, **kw):
    """PEFT's generate, or from 5.24 (where it drops its prefix) the enabled model's own without a cache."""
    return ours.generate(use_cache=False, **kw) if NEW_CACHE else peft_model.generate(**kw)


def test_generate_sampling_matches_peft():
    peft_model, ours, _ = peft_and_ours("llama")
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(7)
    a = _oracle_generate(peft_model, ours, input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    b = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(a, b)


def test_generate_beam_search_matches_peft():
    peft_model, ours, _ = peft_and_ours("llama")
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    a = _oracle_generate(peft_model, ours, input_ids=ids, attention_mask=mask, **kw)
    b = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padding_reaches_attention(kind):
    _, ours, _ = peft_and_ours(kind)
    ids, mask, _ = padded_batch()
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 7) % VOCAB  # change only padded tokens
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=other, attention_mask=mask).logits
        c = ours(input_ids=other).logits  # no mask: the padded tokens are seen
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=1e-6)
    assert (a[real] - c[real]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_from_text_equals_stock_model_on_concatenation(kind):
    """Prefix = K/V activations of real words; the text then continues at position P (PEFT's offset), so the
    result is the stock model run on [words, text]."""
    model = tiny_model(kind).eval()
    words = torch.tensor([5, 17, 29, 41, 53])
    prefix = PrefixTuning.from_text(model, words)
    text = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = model(input_ids=torch.cat([words.expand(2, -1), text], dim=1)).logits[:, len(words):]
        prefix_attn.enable(model, prefix)
        mine = model(input_ids=text).logits
    torch.testing.assert_close(mine, stock, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_disable_restores_stock_model(kind):
    model = tiny_model(kind).eval()
    ids, mask, _ = padded_batch()
    impl = model.config._attn_implementation
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    prefix = PrefixTuning(model.config, P, init="normal", init_std=0.5)
    assert prefix_attn.enable(model, prefix) is model
    assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    assert set(model.state_dict()) == keys | {"prefix_attn.prefix_kv"}, "the prefix is namespaced"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_attn.prefix_kv"]
    with torch.no_grad():
        during = model(input_ids=ids, attention_mask=mask).logits
    assert (during - before).abs().max() > 1e-3
    assert prefix_attn.disable(model) is model
    assert model.config._attn_implementation == impl
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == keys and not hasattr(model, "prefix_attn")
    assert "save_pretrained" not in vars(model)
    assert not hf.is_enabled(model) and not any(hasattr(m, "_prefix_attn_binding") for m in model.modules())
    assert not model.base_model._forward_pre_hooks and not model.base_model._forward_hooks
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("change", [{"num_hidden_layers": 3}, {"num_key_value_heads": 3},
                                    {"num_attention_heads": 3, "num_key_value_heads": 1}])
def test_refuses_prefix_of_another_shape(change):
    model = tiny_model("llama")
    other = tiny_model("llama", **change)
    prefix = PrefixTuning(other.config, P)
    with pytest.raises(ValueError, match="another model shape"):
        prefix_attn.enable(model, prefix)
    assert model.config._attn_implementation != hf.ATTN_IMPLEMENTATION


def test_refuses_gpt2_prefix_with_other_head_dim():
    model = tiny_model("gpt2")
    prefix = PrefixTuning(tiny_model("gpt2", n_head=6).config, P)
    with pytest.raises(ValueError, match="head_dim: prefix 8 vs model 12"):
        prefix_attn.enable(model, prefix)


def test_sliding_window_shorter_than_prefix_plus_text_is_refused():
    model = tiny_model("mistral", sliding_window=8).eval()
    prefix_attn.enable(model, PrefixTuning(model.config, P))
    ids, mask, _ = padded_batch(length=6)
    with pytest.raises((NotImplementedError, ValueError), match="sliding"):
        model(input_ids=ids, attention_mask=mask)


def test_half_precision_model_casts_prefix():
    model = tiny_model("llama").to(torch.bfloat16).eval()
    prefix = PrefixTuning(model.config, P)  # float32
    prefix_attn.enable(model, prefix)
    ids, mask, _ = padded_batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert prefix.prefix_kv.dtype == torch.float32


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("llama")
    for projection in (False, True):
        prefix = PrefixTuning(model.config, P, projection=projection, init="normal")
        path = prefix.save(str(tmp_path / f"p{int(projection)}.safetensors"))
        loaded = PrefixTuning.load(path)
        assert loaded.projection == projection and loaded.shape == prefix.shape
        torch.testing.assert_close(loaded.key_value(), prefix.key_value(), atol=0, rtol=0)
    directory = tmp_path / "dir"
    directory.mkdir()
    PrefixTuning(model.config, P).save(str(directory))
    assert PrefixTuning.load(str(directory)).num_virtual_tokens == P


@pytest.mark.parametrize("projection", [False, True])
def test_load_saved_peft_adapter(tmp_path, projection):
    peft_model, ours, prefix = peft_and_ours("llama", projection=projection)
    peft_model.save_pretrained(str(tmp_path))
    loaded = PrefixTuning.from_peft_adapter(str(tmp_path), ours.config)
    assert not loaded.projection  # PEFT saves the materialised K/V
    torch.testing.assert_close(loaded.key_value(), prefix.key_value().detach(), atol=1e-6, rtol=1e-6)
    # and back into PEFT's layout
    expected = peft_model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(loaded.to_peft_embeddings(), expected, atol=1e-6, rtol=1e-6)


def test_static_cache_is_refused():
    model = tiny_model("llama").eval()
    prefix_attn.enable(model, PrefixTuning(model.config, P))
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-v"]))
