"""Checkpoints hold what was trained: the prefix (and modules_to_save), not the frozen base model; Trainer resumes
from them bitwise; the final save goes back onto a stock base model; PEFT users' habits."""

import json
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_hf_training import _args, _Rows, enabled  # noqa: E402
from test_transformers_integration import VOCAB, P, padded_batch, tiny_model  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixBank, PrefixTuning  # noqa: E402
from prefix_attn.integrations import attention as hf_attention  # noqa: E402
from prefix_attn.integrations import transformers as hf  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


def test_save_pretrained_writes_the_prefix_only_and_loads_onto_a_stock_model(tmp_path):
    model, prefix = enabled("llama")
    model.eval()
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert set(weights) == {"prefix_attn.prefix_kv"}
    assert (tmp_path / "config.json").is_file() and (tmp_path / "prefix.safetensors").is_file()
    meta = json.loads((tmp_path / "prefix_attn.json").read_text())
    assert meta["weights"] == "trainable" and meta["modules_to_save"] == []
    full_size = sum(p.numel() * 4 for p in model.parameters())
    assert os.path.getsize(tmp_path / "model.safetensors") < 0.1 * full_size
    ids, mask, _ = padded_batch()
    restored = prefix_attn.load_pretrained(tmp_path, model=tiny_model("llama")).eval()  # the same base weights
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="model="):  # built from a config: no base model to load by name
        prefix_attn.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="stock base model"):
        prefix_attn.load_pretrained(tmp_path, model=restored)


def test_trainable_only_checkpoint_loads_its_base_by_name(tmp_path):
    base = tiny_model("gpt2")
    base.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    prefix_attn.enable(model, PrefixTuning(model.config, P, init="normal", init_std=0.5))
    model.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "prefix_attn.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")
    restored = prefix_attn.load_pretrained(tmp_path / "run")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(input_ids=ids, attention_mask=mask).logits,
                                   model.eval()(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_trainer_checkpoints_hold_the_prefix_and_resume_bitwise(tmp_path):
    data = _Rows()
    model, prefix = enabled("llama")
    transformers.Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=data).train()
    straight = prefix.prefix_kv.detach().clone()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert set(load_file(str(ckpt / "model.safetensors"))) == {"prefix_attn.prefix_kv"}
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "prefix.safetensors"):
        assert (ckpt / name).is_file(), name
    assert os.path.getsize(ckpt / "model.safetensors") < 4 * prefix.prefix_kv.numel() + 4096

    model, prefix = enabled("llama", seed=11)  # another init: resume must overwrite it with checkpoint-3's
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "b"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 6
    assert torch.equal(prefix.prefix_kv.detach(), straight)
    # the final save goes back onto a stock base model
    trainer.save_model(str(tmp_path / "final"))
    restored = prefix_attn.load_pretrained(tmp_path / "final", model=tiny_model("llama"))
    assert torch.equal(restored.prefix_attn.prefix_kv.detach(), straight)


def test_full_model_saves_stay_available(tmp_path):
    model = tiny_model("gpt2")
    prefix_attn.enable(model, PrefixTuning(model.config, P), save_full_model=True)
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "prefix_attn.prefix_kv" in keys and any(k.startswith("transformer.h.0.") for k in keys)
    restored = prefix_attn.load_pretrained(tmp_path)
    assert torch.equal(restored.prefix_attn.prefix_kv, model.prefix_attn.prefix_kv)


def test_modules_to_save_train_save_and_load(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg)
    stock = {k: v.clone() for k, v in model.state_dict().items()}
    prefix_attn.enable(model, PrefixTuning(model.config, P), modules_to_save=["score"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prefix_attn.prefix_kv", "score.weight"}
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == model.prefix_attn.prefix_kv.numel() + model.score.weight.numel() and total > trainable
    ids = torch.randint(3, VOCAB, (4, 9))
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"prefix_attn.prefix_kv", "score.weight"}
    fresh = transformers.LlamaForSequenceClassification(cfg)
    fresh.load_state_dict(stock)
    restored = prefix_attn.load_pretrained(tmp_path, model=fresh)
    assert torch.equal(restored.score.weight, model.score.weight) and not torch.equal(model.score.weight,
                                                                                       stock["score.weight"])
    assert restored.score.weight.requires_grad  # still trainable after loading
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="modules_to_save"):
        prefix_attn.enable(tiny_model("gpt2"), PrefixTuning(tiny_model("gpt2").config, P), modules_to_save=["nope"])


def test_print_trainable_parameters(capsys):
    model = tiny_model("gpt2")
    own = set(model._keys_to_ignore_on_save or ())
    prefix = PrefixTuning(model.config, P)
    prefix_attn.enable(model, prefix)
    model.print_trainable_parameters()
    n, total = model.get_nb_trainable_parameters()
    assert n == prefix.prefix_kv.numel() and total == sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.strip() == (f"trainable params: {n:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * n / total:.4f}")
    prefix_attn.disable(model)
    assert not hasattr(model, "print_trainable_parameters") and not hasattr(model, "get_nb_trainable_parameters")
    assert set(model._keys_to_ignore_on_save or ()) == own  # the stock save again


def test_models_from_one_config_object_stay_independent():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2)
    a, b = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    prefix_attn.enable(a, PrefixTuning(a.config, P))
    c = transformers.LlamaForCausalLM(cfg)  # built after enable, from the same object
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        a(input_ids=ids), b(input_ids=ids), c(input_ids=ids)
    assert a.config._attn_implementation == "prefix_attn" and cfg._attn_implementation != "prefix_attn"
    assert all(m.config is a.config for m in a.modules() if "config" in vars(m))


def test_lazy_names_are_listed():
    for name in ("PrefixTuning", "PrefixBank", "PrefixShape", "enable", "disable", "load_pretrained"):
        assert name in dir(prefix_attn), name


def test_out_of_range_prefix_ids_name_the_argument():
    model = tiny_model("gpt2")
    bank = PrefixBank({"a": PrefixTuning(model.config, 3), "b": PrefixTuning(model.config, 4)})
    prefix_attn.enable(model, bank)
    ids = torch.randint(3, VOCAB, (2, 5))
    for bad in (torch.tensor([0, 2]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="prefix_ids"), torch.no_grad():
            model(input_ids=ids, prefix_ids=bad)


def test_unreadable_config_message_names_a_real_constructor():
    class Odd:
        pass

    with pytest.raises(ValueError, match=r"PrefixShape\(num_layers, num_kv_heads, head_dim\)") as err:
        PrefixTuning(Odd(), 3)
    assert "from_shape" not in str(err.value)
    shape = prefix_attn.PrefixShape(2, 2, 8)
    assert PrefixTuning(shape, 3).shape == shape


def test_version_outside_the_tested_range_warns_once(monkeypatch):
    monkeypatch.setattr(hf_attention, "_warned_version", [])
    assert hf.check_version(hf.TESTED_TRANSFORMERS[0] + ".0") and hf.check_version(hf.TESTED_TRANSFORMERS[1] + ".3")
    with pytest.warns(UserWarning, match="tested with transformers 5.23 to 5.25"):
        assert not hf.check_version("5.30.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hf.check_version("5.31.0")  # once per process
    assert hf.check_version() or transformers.__version__ not in ("5.23.0", "5.24.0", "5.25.0")
