"""Encoder-decoders (BART and its family) through prefix_attn.enable.

layout="peft" is compared with PEFT's own SEQ_2_SEQ_LM prefix model on the forward (logits, loss, the gradient of
PEFT's prefix matrix) on every release, and on generate() (greedy and beam) where PEFT's generate keeps its prefix
(5.23; peft 0.21.2 drops it on 5.24). Generation is also checked against generate(use_cache=False) through the
same model. layout="li_liang" is compared with a hand-written oracle: every attention module's prefix expanded
over the batch and concatenated with its keys, in plain PyTorch.
"""

import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_versions import NEW_CACHE  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning, prefix_shape_from_config  # noqa: E402
from prefix_attn.integrations.seq2seq import all_attention, split_modules  # noqa: E402
from prefix_attn.peft_format import peft_shape  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
VOCAB, P, PAD, START, EOS = 64, 3, 1, 0, 2
FAMILIES = {
    "bart": ("BartConfig", "BartForConditionalGeneration"),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration"),
    "plbart": ("PLBartConfig", "PLBartForConditionalGeneration"),
    "marian": ("MarianConfig", "MarianMTModel"),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration"),
    "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration"),
    "blenderbot_small": ("BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration"),
}


def seq2seq(family="bart", layers=2, **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
               pad_token_id=PAD, bos_token_id=START, eos_token_id=EOS, decoder_start_token_id=START,
               forced_eos_token_id=None, init_std=0.3, dropout=0.0, attention_dropout=0.0)
    cfg.update(overrides)
    config_name, model_name = FAMILIES[family]
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**cfg)).eval()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    labels = torch.randint(3, VOCAB, (3, 6), generator=g)
    labels[2, 4:] = -100
    return ids.masked_fill(mask == 0, PAD), mask, labels


def peft_model(base, projection=False, std=0.5):
    config = peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P,
                                     prefix_projection=projection, encoder_hidden_size=24)
    pm = peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_(0.0, std)
    return pm


def slot_sums(grad_kv, layers):
    """Per-layer gradients [L, 2, H, P, D] summed into PEFT's slots (decoder layer j reads slot 2j mod L)."""
    out = torch.zeros_like(grad_kv)
    for j in range(layers):
        out[(2 * j) % layers] += grad_kv[j]
    return out


@pytest.mark.parametrize("family,layers", [(f, 2) for f in FAMILIES] + [("bart", 3)])
def test_peft_layout_matches_peft(family, layers):
    base = seq2seq(family, layers)
    ours = copy.deepcopy(base)
    pm = peft_model(base)
    prefix = PrefixTuning.from_peft(pm)
    prefix_attn.enable(ours, prefix)
    ids, mask, labels = batch()
    want = pm(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    real = labels != -100
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=2e-6, rtol=1e-6)
    want.loss.backward()
    got.loss.backward()
    weight = pm.prompt_encoder["default"].embedding.weight
    s = prefix.shape
    peft_grad = weight.grad.view(P, layers, 2, s.num_kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(slot_sums(prefix.prefix_kv.grad, layers), peft_grad, atol=1e-6, rtol=1e-5)
    assert prefix.prefix_kv.grad.abs().sum() > 0


def test_projection_prefix_matches_peft():
    base = seq2seq("bart", 2)
    ours = copy.deepcopy(base)
    pm = peft_model(base, projection=True)
    prefix = PrefixTuning.from_peft(pm)
    assert prefix.projection
    prefix_attn.enable(ours, prefix)
    ids, mask, labels = batch()
    want, got = pm(input_ids=ids, attention_mask=mask, labels=labels), ours(input_ids=ids, attention_mask=mask,
                                                                            labels=labels)
    torch.testing.assert_close(got.loss, want.loss, atol=2e-6, rtol=1e-6)
    want.loss.backward()
    got.loss.backward()
    encoder = pm.prompt_encoder["default"]
    torch.testing.assert_close(prefix.embedding.weight.grad, encoder.embedding.weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(prefix.transform[0].weight.grad, encoder.transform[0].weight.grad, atol=1e-6,
                               rtol=1e-5)


def _generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          **kw)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate(beams):
    base = seq2seq("bart", 2, init_std=0.5)  # varied enough that the prefix changes the tokens
    ours, stock = copy.deepcopy(base), copy.deepcopy(base)
    pm = peft_model(base, std=2.0)
    prefix_attn.enable(ours, PrefixTuning.from_peft(pm))
    ids, mask, _ = batch()
    got = _generate(ours, ids, mask, num_beams=beams)
    torch.testing.assert_close(got, _generate(ours, ids, mask, num_beams=beams, use_cache=False))
    assert not torch.equal(got, _generate(stock, ids, mask, num_beams=beams))  # the prefix changes the output
    if beams == 1:  # greedy by full forwards of PEFT's model, no cache
        seq = torch.full((ids.shape[0], 1), START)
        with torch.no_grad():
            for _ in range(6):
                logits = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        torch.testing.assert_close(got, seq)
    if not NEW_CACHE:  # peft 0.21.2's generate drops its prefix from 5.24
        torch.testing.assert_close(got, _generate(pm, ids, mask, num_beams=beams))


@pytest.mark.parametrize("layers", [2, 3])
def test_peft_adapter_round_trip(tmp_path, layers):
    base = seq2seq("bart", layers)
    prefix = PrefixTuning(base.config, P)
    with torch.no_grad():
        prefix.prefix_kv.normal_(0.0, 0.5)
        if layers == 2:  # PEFT gives layers 0 and 1 one slot: a prefix it can hold has them equal
            prefix.prefix_kv[1].copy_(prefix.prefix_kv[0])
    path = prefix.save_peft_adapter(os.fspath(tmp_path / "adapter"), task_type="SEQ_2_SEQ_LM")
    back = PrefixTuning.from_peft_adapter(path, base.config)
    torch.testing.assert_close(back.prefix_kv, prefix.prefix_kv, atol=0, rtol=0)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    ours = prefix_attn.enable(copy.deepcopy(base), prefix)
    ids, mask, labels = batch()
    with torch.no_grad():
        want = loaded(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(PrefixTuning.from_peft(loaded).prefix_kv, prefix.prefix_kv, atol=0, rtol=0)
    if layers == 2:
        with torch.no_grad():
            prefix.prefix_kv[1].add_(1.0)
        with pytest.raises(ValueError, match="decoder layers 0 and 1 one prefix"):
            prefix.save_peft_adapter(os.fspath(tmp_path / "untied"), task_type="SEQ_2_SEQ_LM")


@pytest.mark.parametrize("projection", [False, True])
def test_adapter_saved_by_peft_loads(tmp_path, projection):
    base = seq2seq("bart", 2)
    pm = peft_model(copy.deepcopy(base), projection=projection)
    pm.save_pretrained(tmp_path / "peft")
    prefix = PrefixTuning.from_peft_adapter(os.fspath(tmp_path / "peft"), base.config)
    ours = prefix_attn.enable(copy.deepcopy(base), prefix)
    ids, mask, labels = batch()
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels).logits, want,
                                   atol=2e-5, rtol=1e-5)


def test_save_and_load_pretrained(tmp_path):
    base = seq2seq("bart", 2)
    model = prefix_attn.enable(copy.deepcopy(base), PrefixTuning(prefix_shape_from_config(base.config,
                                                                                          "li_liang"), P),
                               layout="li_liang")
    with torch.no_grad():
        model.prefix_attn.prefix_kv.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "ckpt")
    back = prefix_attn.load_pretrained(tmp_path / "ckpt", model=copy.deepcopy(base))
    assert back._prefix_attn_binding.layout == "li_liang"
    ids, mask, labels = batch()
    model.save_pretrained(tmp_path / "full", full_model=True)
    full = prefix_attn.load_pretrained(tmp_path / "full", transformers.AutoModelForSeq2SeqLM)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        for loaded in (back, full):
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, labels=labels).loss, want,
                                       atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- Li & Liang
_ORACLE = {}


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over [prefix expanded over the batch; keys], the model's own mask extended by P visible
    columns."""
    pk, pv = _ORACLE[id(module)]
    rows, len_q = query.shape[0], query.shape[2]
    key = torch.cat([pk[None].expand(rows, -1, -1, -1), key], 2)
    value = torch.cat([pv[None].expand(rows, -1, -1, -1), value], 2)
    scores = (query @ key.transpose(-1, -2)) * scaling
    text = key.shape[2] - P
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1
        allowed = allowed.expand(rows, 1, len_q, text)
    else:
        allowed = torch.ones(rows, 1, len_q, text, dtype=torch.bool)
    if module.is_causal:
        allowed = allowed & torch.ones(len_q, text, dtype=torch.bool).tril(text - len_q)
    allowed = torch.cat([torch.ones(rows, 1, len_q, P, dtype=torch.bool), allowed], -1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2), None


def _oracle(base, prefix):
    """The stock model (eager mask) with every module's prefix handed to _oracle_attention, decoder positions
    after the prefix."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("li_liang_oracle", _oracle_attention)
    AttentionMaskInterface.register("li_liang_oracle", sdpa_mask)
    model = copy.deepcopy(base)
    model.set_attn_implementation("li_liang_oracle")
    enc, dec, cross = split_modules(model, all_attention(model))
    kv = prefix.key_value()
    for i, m in enumerate(enc + dec + cross):
        _ORACLE[id(m)] = (kv[i, 0], kv[i, 1])

    def shift(module, args, kwargs):
        kwargs["position_ids"] = kwargs["position_ids"] + P
        return args, kwargs

    model.get_decoder().embed_positions.register_forward_pre_hook(shift, with_kwargs=True)
    return model


def test_li_liang_layout_matches_expand_concat_oracle():
    base = seq2seq("bart", 2, decoder_layers=3)
    shape = prefix_shape_from_config(base.config, layout="li_liang")
    assert shape.num_layers == 2 + 2 * 3
    prefix = PrefixTuning(shape, P)
    with torch.no_grad():
        prefix.prefix_kv.normal_(0.0, 0.5)
    twin = copy.deepcopy(prefix)
    ours = prefix_attn.enable(copy.deepcopy(base), prefix, layout="li_liang")
    oracle = _oracle(base, twin)
    ids, mask, labels = batch()
    labels = torch.cat([labels, labels[:, :5]], 1)  # 11 decoder tokens: more queries than encoder keys (9)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    want = oracle(input_ids=ids, attention_mask=mask, labels=labels)
    real = labels != -100
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=2e-5, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(prefix.prefix_kv.grad, twin.prefix_kv.grad, atol=1e-6, rtol=1e-5)
    for part in (slice(0, 2), slice(2, 5), slice(5, 8)):  # encoder, decoder, cross-attention prefixes all learn
        assert prefix.prefix_kv.grad[part].abs().sum() > 0
    gen = _generate(ours, ids, mask, num_beams=2)
    torch.testing.assert_close(gen, _generate(ours, ids, mask, num_beams=2, use_cache=False))


# ---------------------------------------------------------------------------------------------- refusals
def test_refusals():
    model = seq2seq("bart", 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        prefix_attn.enable(model, PrefixTuning(model.config, P), layout="encoder")
    with pytest.raises(ValueError, match="num_layers: prefix 2 vs model 6"):
        prefix_attn.enable(model, PrefixTuning(model.config, P), layout="li_liang")
    with pytest.raises(NotImplementedError, match="PrefixBank on an encoder-decoder"):
        prefix_attn.enable(model, prefix_attn.PrefixBank([PrefixTuning(model.config, P)]))
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen
    with pytest.raises(ValueError, match="encoder_attention_heads=4, decoder_attention_heads=2"):
        prefix_shape_from_config(seq2seq("bart", 2, decoder_attention_heads=2).config, layout="li_liang")
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(NotImplementedError, match="relative position bias"):
        prefix_attn.enable(t5, PrefixTuning(prefix_attn.PrefixShape(2, 4, 8), P))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    m2m = transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64))
    with pytest.raises(NotImplementedError, match="cannot shift past the prefix"):
        prefix_attn.enable(m2m, PrefixTuning(m2m.config, P))
    with pytest.raises(ValueError, match="for encoder-decoders"):
        prefix_attn.enable(gpt2, PrefixTuning(gpt2.config, P), layout="li_liang")
    peft_cfg = peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P)
    with pytest.raises(ValueError, match="is not an encoder-decoder"):
        peft_shape(peft_cfg.__class__(**{**peft_cfg.to_dict(), "num_layers": 1,
                                                                  "num_attention_heads": 2, "token_dim": 16,
                                                                  "num_transformer_submodules": 2}), gpt2.config)


def test_hidden_state_prefix_in_every_attention():
    """A hidden-state prefix projects each slot through its own module's frozen k_proj / v_proj (the encoder's,
    the decoder's self-attention, the cross-attention); materialize() keeps the outputs."""
    base = seq2seq("bart", 2)
    shape = prefix_shape_from_config(base.config, layout="li_liang")
    prefix = PrefixTuning(shape, P, parameterization="hidden", hidden_size=32)
    with torch.no_grad():
        prefix.prefix_hidden.normal_(0.0, 1.0)
    ours = prefix_attn.enable(copy.deepcopy(base), prefix, layout="li_liang")
    enc, dec, cross = split_modules(ours, all_attention(ours))
    kv = prefix.key_value()
    for i, m in enumerate(enc + dec + cross):
        torch.testing.assert_close(kv[i, 0], m.k_proj(prefix.prefix_hidden[i]).view(P, 4, 8).transpose(0, 1))
    ids, mask, labels = batch()
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, labels=labels).logits
    with pytest.raises(ValueError, match="follow its layout"):
        copy.deepcopy(prefix).bind(ours)
    direct = copy.deepcopy(prefix).bind(enc + dec + cross).materialize()
    again = prefix_attn.enable(copy.deepcopy(base), direct, layout="li_liang")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, labels=labels).logits, want,
                                   atol=1e-5, rtol=1e-5)
