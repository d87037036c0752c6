"""PrefixBank on stock transformers decoders: a mixed batch gives, row by row, what PEFT's model with that row's
adapter gives (logits, loss, prefix gradients, greedy and beam generation, left padding), with adapters of
different lengths; the module, save/load and the errors."""

import copy
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from hf_versions import NEW_CACHE  # noqa: E402
from test_transformers_integration import VOCAB, tiny_model  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixBank, PrefixTuning  # noqa: E402

LENGTHS = {"a": 3, "b": 6}  # two adapters, two prefix lengths


def peft_models_and_ours(kind):
    """({name: peft model}, our model with a bank of the same adapters)."""
    base = tiny_model(kind).eval()
    ours = copy.deepcopy(base)
    peft_models, prefixes = {}, {}
    for i, (name, P) in enumerate(LENGTHS.items()):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=P))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in pm.prompt_encoder["default"].parameters():
                p.normal_(0.0, 0.5)
        peft_models[name] = pm.eval()
        prefixes[name] = PrefixTuning.from_peft(pm)
    bank = PrefixBank(prefixes)
    prefix_attn.enable(ours, bank)
    return peft_models, ours.eval(), bank


def batch(seed=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :6] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


ROWS = ["b", "a", "b", "a"]


def row_sum_loss(logits, ids, mask):
    """Sum over rows of each row's mean next-token loss (so every row's gradient is its own)."""
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
    return (ce.sum(1) / (labels != -100).sum(1)).sum()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_batch_matches_peft_row_by_row(kind):
    peft_models, ours, bank = peft_models_and_ours(kind)
    ids, mask = batch()
    out = ours(input_ids=ids, attention_mask=mask, prefix_ids=ROWS)
    loss = row_sum_loss(out.logits, ids, mask)
    loss.backward()
    for name, pm in peft_models.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        want = pm(input_ids=ids[rows], attention_mask=mask[rows])
        scale = max(1.0, want.logits.abs().max().item())
        torch.testing.assert_close(out.logits[rows], want.logits, atol=2e-5 * scale, rtol=1e-5)
        row_sum_loss(want.logits, ids[rows], mask[rows]).backward()
        g = pm.prompt_encoder["default"].embedding.weight.grad
        expected = PrefixTuning._kv_from_peft_embeddings(g, bank[name].shape, LENGTHS[name])
        torch.testing.assert_close(bank[name].prefix_kv.grad, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_matches_peft_row_by_row(kind, beams):
    peft_models, ours, bank = peft_models_and_ours(kind)
    ids, mask = batch(seed=6)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, prefix_ids=bank.ids(ROWS), **kw)
        for name, pm in peft_models.items():
            rows = [i for i, r in enumerate(ROWS) if r == name]
            if NEW_CACHE:  # peft 0.21.2's generate drops its prefix from 5.24: those rows alone, without a cache
                want = ours.generate(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False,
                                     prefix_ids=bank.ids([name] * len(rows)), **kw)
            else:
                want = pm.generate(input_ids=ids[rows], attention_mask=mask[rows], **kw)
            assert torch.equal(got[rows], want), name


def test_bank_module_and_errors(tmp_path):
    peft_models, ours, bank = peft_models_and_ours("gpt2")
    assert ours.prefix_attn is bank and bank["a"] is bank[0] and len(bank) == 2
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        "prefix_attn.entries.0.prefix_kv", "prefix_attn.entries.1.prefix_kv"}
    ids, mask = batch()
    with pytest.raises(ValueError, match="enabled with a PrefixBank .* pass prefix_ids"):
        ours(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="prefix_ids has 2 entries but the batch has 4 rows"):
        ours(input_ids=ids, attention_mask=mask, prefix_ids=["a", "b"])
    with pytest.raises(KeyError, match="no bank entry named 'c'"):
        ours(input_ids=ids, attention_mask=mask, prefix_ids=["a", "b", "c", "a"])
    # save / load, alone and inside save_pretrained / load_pretrained
    bank.save(str(tmp_path / "bank"))
    again = PrefixBank.load(str(tmp_path / "bank"))
    assert again.names == ["a", "b"] and torch.equal(again["b"].prefix_kv, bank["b"].prefix_kv)
    ours.save_pretrained(tmp_path / "ckpt")
    stock = prefix_attn.disable(copy.deepcopy(ours))  # the base model: checkpoints hold the bank's tensors only
    restored = prefix_attn.load_pretrained(tmp_path / "ckpt", model=stock).eval()
    assert isinstance(restored.prefix_attn, PrefixBank)
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask, prefix_ids=ROWS).logits,
                                   ours(input_ids=ids, attention_mask=mask, prefix_ids=ROWS).logits, atol=0, rtol=0)
    # an entry works alone afterwards
    single = copy.deepcopy(ours)
    prefix_attn.disable(single)
    prefix_attn.enable(single, copy.deepcopy(bank["a"]))
    with torch.no_grad():
        torch.testing.assert_close(single(input_ids=ids[[1, 3]], attention_mask=mask[[1, 3]]).logits,
                                   ours(input_ids=ids[[1, 3]], attention_mask=mask[[1, 3]], prefix_ids=["a", "a"])
                                   .logits, atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="enabled with a single PrefixTuning"):
            single(input_ids=ids, attention_mask=mask, prefix_ids=ROWS)
    with pytest.raises(ValueError, match="one model shape"):
        PrefixBank([bank["a"], PrefixTuning(tiny_model("llama").config, 3)])


def test_sampling_with_a_bank():
    """Sampling runs on a mixed batch; with every row on one entry it equals that prefix enabled alone (same
    seed, same draws)."""
    peft_models, ours, bank = peft_models_and_ours("llama")
    ids, mask = batch(seed=8)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0, num_return_sequences=2)
    torch.manual_seed(3)
    mixed = ours.generate(input_ids=ids, attention_mask=mask, prefix_ids=bank.ids(ROWS), **kw)
    assert mixed.shape == (8, 15)
    torch.manual_seed(4)
    got = ours.generate(input_ids=ids, attention_mask=mask, prefix_ids=bank.ids(["b"] * 4), **kw)
    single = copy.deepcopy(ours)
    prefix_attn.disable(single)
    prefix_attn.enable(single, copy.deepcopy(bank["b"]))
    torch.manual_seed(4)
    want = single.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_bank_from_peft_adapter_directories(tmp_path):
    peft_models, ours, bank = peft_models_and_ours("llama")
    paths = {}
    for name, pm in peft_models.items():
        pm.save_pretrained(str(tmp_path / name))
        paths[name] = str(tmp_path / name)
    loaded = PrefixBank.from_peft_adapters(paths, ours.config)
    assert loaded.names == ["a", "b"] and [m.num_virtual_tokens for m in loaded.entries] == [3, 6]
    for name in paths:
        torch.testing.assert_close(loaded[name].prefix_kv, bank[name].prefix_kv, atol=0, rtol=0)
