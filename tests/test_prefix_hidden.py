"""Hidden-state prefixes (parameterization="hidden"): K/V through the model's frozen projections, against PEFT run
on hand-computed K/V (outputs and the chain-rule gradient), training, materialize, save/load; and the export of
any prefix as a PEFT adapter directory, loaded by PeftModel.from_pretrained."""

import copy
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_transformers_integration import P, padded_batch, peft_and_ours, tiny_model  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
# fused c_attn; k_proj / v_proj without and with biases; a head_dim other than hidden / heads
KINDS = [("gpt2", {}), ("llama", {}), ("qwen2", {}), ("llama", {"head_dim": 16})]
KIND_IDS = ["gpt2", "llama", "qwen2", "llama-head_dim16"]


def manual_kv(model, rows):
    """[L, 2, Hkv, P, D] written out by hand from each layer's weights (rows [L, P, hidden])."""
    cfg = model.config
    out = []
    for layer in range(rows.shape[0]):
        x = rows[layer]
        if hasattr(model, "transformer"):  # GPT-2: Conv1D c_attn [hidden, 3 * hidden], q | k | v
            attn = model.transformer.h[layer].attn
            E, H = cfg.n_embd, cfg.n_head
            w, b = attn.c_attn.weight, attn.c_attn.bias
            k, v = x @ w[:, E:2 * E] + b[E:2 * E], x @ w[:, 2 * E:] + b[2 * E:]
            Hkv, D = H, E // H
        else:
            attn = model.model.layers[layer].self_attn
            k = x @ attn.k_proj.weight.T + (attn.k_proj.bias if attn.k_proj.bias is not None else 0)
            v = x @ attn.v_proj.weight.T + (attn.v_proj.bias if attn.v_proj.bias is not None else 0)
            Hkv = cfg.num_key_value_heads
            D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        out.append(torch.stack([k.view(-1, Hkv, D).transpose(0, 1), v.view(-1, Hkv, D).transpose(0, 1)]))
    return torch.stack(out)


def hidden_prefix_and_peft(kind, **overrides):
    """(peft_model holding the hand-computed K/V, our model with a hidden prefix, the prefix)."""
    peft_model, ours, _ = peft_and_ours(kind, **overrides)
    base = dict(peft_model.get_base_model().named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random biases (the models initialise them to zero): the projections' biases count
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                base[name].copy_(p)
    prefix = PrefixTuning(ours.config, P, parameterization="hidden", init_std=0.5)
    prefix_attn.enable(ours, prefix)
    with torch.no_grad():
        kv = manual_kv(ours, prefix.prefix_hidden)
        emb = peft_model.prompt_encoder["default"].embedding.weight
        emb.copy_(kv.permute(3, 0, 1, 2, 4).reshape(P, -1))
    return peft_model, ours, prefix


@pytest.mark.parametrize("kind,overrides", KINDS, ids=KIND_IDS)
def test_kv_are_rows_through_the_frozen_projections(kind, overrides):
    _, ours, prefix = hidden_prefix_and_peft(kind, **overrides)
    torch.testing.assert_close(prefix.key_value(), manual_kv(ours, prefix.prefix_hidden), atol=1e-6, rtol=1e-6)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prefix_attn.prefix_hidden"]
    cfg = ours.config
    hidden = cfg.n_embd if kind == "gpt2" else cfg.hidden_size
    assert prefix.prefix_hidden.shape == (prefix.num_layers, P, hidden)


@pytest.mark.parametrize("kind,overrides", KINDS, ids=KIND_IDS)
def test_outputs_and_gradient_match_peft_on_hand_computed_kv(kind, overrides):
    peft_model, ours, prefix = hidden_prefix_and_peft(kind, **overrides)
    ids, mask, labels = padded_batch()
    a = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=2e-5)
    a.loss.backward()
    b.loss.backward()
    # chain rule by hand: PEFT's K/V gradient through the frozen projections
    g_kv = PrefixTuning._kv_from_peft_embeddings(peft_model.prompt_encoder["default"].embedding.weight.grad,
                                                  prefix.shape, P)
    rows = prefix.prefix_hidden.detach().clone().requires_grad_()
    torch.autograd.backward(manual_kv(ours, rows), g_kv)
    torch.testing.assert_close(prefix.prefix_hidden.grad, rows.grad, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for n, p in ours.named_parameters() if n != "prefix_attn.prefix_hidden")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_training_moves_only_the_rows_and_materialize_keeps_outputs(kind, tmp_path):
    _, ours, prefix = hidden_prefix_and_peft(kind)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if n != "prefix_attn.prefix_hidden"}
    start = prefix.prefix_hidden.detach().clone()
    opt = torch.optim.AdamW(prefix.parameters(), lr=1e-2)
    ids, mask, labels = padded_batch()
    losses = []
    for _ in range(5):
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.equal(prefix.prefix_hidden, start)
    for n, p in ours.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    ours.eval()
    want = ours(input_ids=ids, attention_mask=mask).logits
    # save / load keeps the parameterisation; loading gives an unbound prefix until enable
    loaded = PrefixTuning.load(prefix.save(str(tmp_path / "p.safetensors")))
    assert loaded.parameterization == "hidden"
    with pytest.raises(RuntimeError, match="not bound"):
        loaded.key_value()
    other = copy.deepcopy(ours)
    prefix_attn.enable(other, loaded)
    torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits, want, atol=0, rtol=0)
    # checkpoints of the enabled model
    ours.save_pretrained(str(tmp_path / "ckpt"))
    stock = prefix_attn.disable(copy.deepcopy(ours))  # the base model: checkpoints hold the prefix only
    back = prefix_attn.load_pretrained(str(tmp_path / "ckpt"), model=stock).eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, want, atol=0, rtol=0)
    assert back.prefix_attn.parameterization == "hidden"
    kv = prefix.key_value().detach().clone()
    prefix.materialize()
    assert prefix.parameterization == "direct" and torch.equal(prefix.prefix_kv, kv)
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, want, atol=1e-6, rtol=1e-6)


def test_each_model_projects_through_its_own_weights_and_copies_stay_small():
    """One prefix enabled on two models: each forward uses its own model's projections. A copy of the prefix alone
    does not carry the model's layers; a copy of the model keeps working."""
    _, m1, prefix = hidden_prefix_and_peft("llama")
    ids, mask, _ = padded_batch()
    before = m1(input_ids=ids, attention_mask=mask).logits
    m2 = tiny_model("llama")
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(1.5)
    prefix_attn.enable(m2, prefix)
    assert not torch.allclose(m2(input_ids=ids, attention_mask=mask).logits, before, atol=1e-3)
    torch.testing.assert_close(m1(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    alone = copy.deepcopy(prefix)
    assert alone._bound_attention is None and [n for n, _ in alone.named_parameters()] == ["prefix_hidden"]
    twin = copy.deepcopy(m1)
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)


def test_sharded_offloaded_or_quantised_weights_are_refused():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj = torch.nn.Linear(48, 16, device="meta")
            self.v_proj = torch.nn.Linear(48, 16, device="meta")

    prefix = PrefixTuning(tiny_model("llama").config, P, parameterization="hidden")
    prefix.bind([Attn(), Attn()])
    with pytest.raises(NotImplementedError, match="meta device"):
        prefix.key_value()


def test_from_text_starts_every_layer_at_the_word_embeddings():
    model = tiny_model("llama").eval()
    tokens = [5, 17, 3]
    prefix = PrefixTuning.from_text(model, tokens, parameterization="hidden")
    emb = model.get_input_embeddings().weight[tokens]
    assert prefix.num_virtual_tokens == 3
    for layer in range(prefix.num_layers):
        assert torch.equal(prefix.prefix_hidden[layer], emb)
    torch.testing.assert_close(prefix.key_value(), manual_kv(model, prefix.prefix_hidden), atol=1e-6, rtol=1e-6)


def test_errors():
    model = tiny_model("gpt2")
    prefix = PrefixTuning(model.config, P, parameterization="hidden")
    with pytest.raises(RuntimeError, match="not bound"):
        prefix.key_value()
    with pytest.raises(ValueError, match="parameterization"):
        PrefixTuning(model.config, P, parameterization="lora")
    with pytest.raises(ValueError, match="hidden_size"):
        PrefixTuning(prefix.shape, P, parameterization="hidden")
    with pytest.raises(ValueError, match="cannot bind"):
        prefix.bind([model.transformer.h[0].attn])
    with pytest.raises(NotImplementedError, match="k_proj"):
        prefix.bind([torch.nn.Linear(2, 2)] * prefix.num_layers)


# ---------------------------------------------------------------------------------------------- export to PEFT
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["direct", "mlp", "hidden"])
def test_save_peft_adapter_loads_in_peft_with_the_same_logits(kind, mode, tmp_path):
    base = tiny_model(kind).eval()
    ours = copy.deepcopy(base)
    if mode == "hidden":
        prefix = PrefixTuning(ours.config, P, parameterization="hidden", init_std=0.5)
    else:
        prefix = PrefixTuning(ours.config, P, projection=mode == "mlp", init_std=0.5)
    prefix_attn.enable(ours, prefix)
    ids, mask, _ = padded_batch()
    want = ours(input_ids=ids, attention_mask=mask).logits
    if mode != "direct":
        prefix.materialize()
    path = prefix.save_peft_adapter(str(tmp_path / "adapter"), base_model_name="tiny-" + kind)
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["base_model_name_or_path"] == "tiny-" + kind
    loaded = peft.PeftModel.from_pretrained(base, path).eval()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, atol=2e-5, rtol=2e-5)
    # and back: the adapter directory as a prefix_attn prefix
    back = PrefixTuning.from_peft_adapter(path, ours.config)
    torch.testing.assert_close(back.key_value(), prefix.key_value(), atol=0, rtol=0)


def test_peft_adapter_round_trip_from_peft(tmp_path):
    """A PEFT-trained adapter directory -> prefix_attn -> an adapter directory again: the same tensor."""
    peft_model, _, _ = peft_and_ours("llama")
    peft_model.save_pretrained(str(tmp_path / "a"))
    prefix = PrefixTuning.from_peft_adapter(str(tmp_path / "a"), peft_model.get_base_model().config)
    prefix.save_peft_adapter(str(tmp_path / "b"))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(a, b)
