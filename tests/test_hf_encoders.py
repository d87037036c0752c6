"""BERT-style encoders (P-Tuning v2: a prefix at every layer of a bidirectional encoder) through prefix_attn.enable.

The oracle is PEFT's construction run on the stock model: the prefix K/V of every layer in a ``DynamicCache``, the
attention mask extended by P ones, BERT's absolute positions counted from the cache length P. On transformers
releases where PEFT's own SEQ_CLS / TOKEN_CLS prefix model runs (peft 0.22: 5.23 to 5.25; peft 0.21.2: 5.23 only), it
is compared with PEFT as well; peft 0.21.2 refuses BERT from 5.24 ("does not support past key values").
"""

import copy
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
VOCAB, P, LAYERS = 60, 3, 2
FAMILIES = {  # family: (config class, sequence-classification class, token-classification class)
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification,
             transformers.BertForTokenClassification),
    "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification,
                transformers.RobertaForTokenClassification),
    "electra": (transformers.ElectraConfig, transformers.ElectraForSequenceClassification,
                transformers.ElectraForTokenClassification),
    "xlm_roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaForSequenceClassification,
                    transformers.XLMRobertaForTokenClassification),
}
PAD = 1  # RoBERTa's padding_idx (its positions count from PAD + 1)


def bert(kind, family="bert", **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=72, num_labels=3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    cfg.update(overrides)
    config_class, seq, token = FAMILIES[family]
    return (seq if kind == "seq" else token)(config_class(**cfg))


def batch(kind):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, PAD)
    if kind == "seq":
        labels = torch.tensor([0, 2, 1])
    else:
        labels = torch.randint(0, 3, (3, 7), generator=g).masked_fill(mask == 0, -100)
    return ids, mask, labels


def prefix_for(model):
    prefix = PrefixTuning(model.config, P)
    with torch.no_grad():
        prefix.prefix_kv.normal_(0.0, 0.5)
    return prefix


def oracle(base, prefix, ids, mask, labels):
    """The stock model with the prefix K/V in its cache (differentiable) and the mask extended by P ones."""
    kv = prefix.key_value()  # [L, 2, H, P, D]
    cache = transformers.DynamicCache(config=base.config)
    rows = ids.shape[0]
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None].expand(rows, -1, -1, -1), kv[layer, 1][None].expand(rows, -1, -1, -1),
                     layer)
    full = torch.cat([torch.ones(rows, P, dtype=mask.dtype), mask], 1)
    params = inspect.signature(type(base.base_model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return base(input_ids=ids, attention_mask=full, labels=labels, **{name: cache})


def real_positions(kind, logits, mask):
    return logits if kind == "seq" else logits[mask.bool()]


ENCODER_CASES = [("bert", "seq", "cpu"), ("bert", "token", "cpu"), ("bert", "seq", "torch"), ("bert", "token", "torch"),
                 ("roberta", "seq", "cpu"), ("roberta", "token", "cpu"), ("xlm_roberta", "seq", "cpu"),
                 ("electra", "seq", "cpu"), ("electra", "token", "cpu")]


@pytest.mark.parametrize("family,kind,backend", ENCODER_CASES)
def test_encoder_matches_the_prefix_in_the_cache(family, kind, backend, monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", backend)
    base = bert(kind, family).eval()
    ours = copy.deepcopy(base)
    prefix = prefix_for(ours)
    want_prefix = copy.deepcopy(prefix)
    prefix_attn.enable(ours, prefix, modules_to_save=["classifier"])
    ids, mask, labels = batch(kind)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    want = oracle(base, want_prefix, ids, mask, labels)
    torch.testing.assert_close(real_positions(kind, got.logits, mask), real_positions(kind, want.logits, mask),
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=2e-6, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(prefix.prefix_kv.grad, want_prefix.prefix_kv.grad, atol=2e-6, rtol=1e-5)
    assert not ours.base_model.embeddings.word_embeddings.weight.requires_grad
    stock = dict(base.named_parameters())
    heads = [(n, p) for n, p in ours.named_parameters() if n.startswith("classifier.")]
    assert heads and all(p.requires_grad for _, p in heads)
    for name, p in heads:  # the head (BERT: one Linear; RoBERTa: dense + out_proj) is trained, as PEFT's
        torch.testing.assert_close(p.grad, stock[name].grad, atol=2e-6, rtol=1e-5)
    plain = base(input_ids=ids, attention_mask=mask).logits
    assert (real_positions(kind, plain, mask) - real_positions(kind, want.logits, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("family,kind", [("bert", "seq"), ("bert", "token"), ("roberta", "seq"), ("electra", "seq")])
def test_encoder_matches_peft_where_peft_runs(family, kind):
    base = bert(kind, family).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="SEQ_CLS" if kind == "seq" else "TOKEN_CLS", num_virtual_tokens=P))
    ids, mask, labels = batch(kind)
    try:
        want = pm(input_ids=ids, attention_mask=mask, labels=labels)
    except ValueError as exc:
        if "past key values" not in str(exc):
            raise
        pytest.skip(f"PEFT's prefix model refuses BERT on transformers {transformers.__version__}: {exc}; "
                    f"test_encoder_matches_the_prefix_in_the_cache runs its construction")
    prefix = PrefixTuning.from_peft(pm)
    ours = prefix_attn.enable(copy.deepcopy(base), prefix, modules_to_save=["classifier"])
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(real_positions(kind, got.logits, mask), real_positions(kind, want.logits, mask),
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=2e-6, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    peft_grad = pm.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(prefix.prefix_kv.grad, PrefixTuning._kv_from_peft_embeddings(peft_grad, prefix.shape, P),
                               atol=2e-6, rtol=1e-5)


def test_encoder_classifier_trains_and_reloads(tmp_path):
    model = bert("seq")
    prefix_attn.enable(model, prefix_for(model), modules_to_save=["classifier"])
    ids, mask, labels = batch("seq")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    restored = prefix_attn.load_pretrained(tmp_path, model=bert("seq"))
    with torch.no_grad():
        got = restored.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _refused(name):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=72, num_labels=2)
    return {
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=LAYERS, num_heads=4)),
        "deberta_v2": lambda: transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**common)),
        "distilbert": lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=48, max_position_embeddings=72)),
        "modernbert": lambda: transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=72, num_labels=2, pad_token_id=0)),
    }[name]()


@pytest.mark.parametrize("name,reason", [("t5", "relative position bias"),
                                         ("deberta_v2", "no attention modules with a layer_idx"),
                                         ("distilbert", "no attention modules with a layer_idx"),
                                         ("modernbert", "takes no KV cache")])
def test_unsupported_models_are_refused_at_enable_with_the_reason(name, reason):
    model = _refused(name)
    with pytest.raises(NotImplementedError, match=reason):
        prefix_attn.enable(model, PrefixTuning(prefix_attn.PrefixShape(LAYERS, 4, 8), P))
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen
    assert not prefix_attn.integrations.transformers.is_enabled(model)


class _HandKV:
    """The K/V of a hidden-state prefix computed by hand (rows @ W^T + b through each layer's key / value)."""

    def __init__(self, modules, rows):
        self.modules, self.rows = modules, rows

    def key_value(self):
        out = []
        for layer, m in enumerate(self.modules):
            k, v = m.key(self.rows[layer]), m.value(self.rows[layer])
            out.append(torch.stack([t.view(P, 4, 8).transpose(0, 1) for t in (k, v)]))
        return torch.stack(out)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_hidden_state_prefix_projects_through_key_value(family):
    """BERT-style attention has ``key`` / ``value`` projections: a hidden-state prefix reads them, frozen."""
    base = bert("seq", family).eval()
    ours = copy.deepcopy(base)
    prefix = PrefixTuning(base.config, P, parameterization="hidden")
    with torch.no_grad():
        prefix.prefix_hidden.normal_(0.0, 1.0)
    rows = prefix.prefix_hidden.detach().clone().requires_grad_(True)
    prefix_attn.enable(ours, prefix, modules_to_save=["classifier"])
    ids, mask, labels = batch("seq")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    from prefix_attn.hidden import attention_modules

    want = oracle(base, _HandKV(attention_modules(base), rows), ids, mask, labels)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-6, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(prefix.prefix_hidden.grad, rows.grad, atol=2e-6, rtol=1e-5)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".key." in n or ".value." in n)
