"""An enabled model trains like any transformers model: the prefix is a submodule (parameters, state_dict,
deepcopy, pickle, save_pretrained), transformers.Trainer trains and resumes it, DDP reduces its gradient, and
torch.compile traces it. Tiny random GPT-2 / Llama on the CPU, float32."""

import copy
import io
import json
import os
import pickle
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_transformers_integration import VOCAB, P, padded_batch, tiny_model  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def enabled(kind="gpt2", projection=False, seed=0, **overrides):
    model = tiny_model(kind, **overrides)
    torch.manual_seed(seed)
    prefix = PrefixTuning(model.config, P, projection=projection, init="normal", init_std=0.5)
    return prefix_attn.enable(model, prefix), prefix


def prefix_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_is_a_submodule(projection):
    model, prefix = enabled(projection=projection)
    assert model.prefix_attn is prefix
    expected = (["prefix_attn.embedding.weight", "prefix_attn.transform.0.weight", "prefix_attn.transform.0.bias",
                 "prefix_attn.transform.2.weight", "prefix_attn.transform.2.bias"] if projection
                else ["prefix_attn.prefix_kv"])
    assert prefix_names(model) == expected
    assert [k for k in model.state_dict() if k.startswith("prefix_attn.")] == expected
    ids, mask, labels = padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in prefix.parameters())
    model.to(torch.float64)  # .to() reaches the prefix
    assert all(p.dtype == torch.float64 for p in prefix.parameters())


def test_enable_twice_replaces_the_prefix_and_disable_removes_it():
    model, first = enabled()
    second = PrefixTuning(model.config, P + 2)
    prefix_attn.enable(model, second)
    assert model.prefix_attn is second and prefix_names(model) == ["prefix_attn.prefix_kv"]
    assert len(model.base_model._forward_pre_hooks) == 1 and len(model.base_model._forward_hooks) == 1
    prefix_attn.disable(model)
    assert not hasattr(model, "prefix_attn") and all(p.requires_grad for p in model.parameters())


def test_no_kv_outlives_the_forward():
    model, prefix = enabled(projection=True)
    binding = model._prefix_attn_binding
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert binding.kv is None and binding.kv_after is None
    with pytest.raises(ZeroDivisionError):  # a forward that raises drops it too
        model.base_model.register_forward_pre_hook(lambda *a: 1 / 0)
        model(input_ids=ids, attention_mask=mask)
    assert binding.kv is None and binding.depth == 0


# ---------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("after", ["eval", "train"])
def test_deepcopy_at_any_time_follows_its_own_prefix(projection, after):
    model, _ = enabled(projection=projection)
    ids, mask, labels = padded_batch()
    if after == "eval":
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    else:
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        del out
    clone = copy.deepcopy(model)
    assert clone.prefix_attn is not model.prefix_attn
    assert clone._prefix_attn_binding.prefix is clone.prefix_attn
    assert all(m._prefix_attn_binding is clone._prefix_attn_binding
               for m in clone._prefix_attn_binding.attention_modules)
    clone.eval()
    model.eval()
    with torch.no_grad():
        before = clone(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(before, model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
        for p in clone.prefix_attn.parameters():
            p.mul_(1.5)
        after_edit = clone(input_ids=ids, attention_mask=mask).logits
        original = model(input_ids=ids, attention_mask=mask).logits
    assert (after_edit - before).abs().max() > 1e-3, "the copy must read its own (edited) prefix"
    torch.testing.assert_close(original, before, atol=0, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_pickle_and_torch_save(projection):
    model, _ = enabled(projection=projection)
    ids, mask, labels = padded_batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    for restored in (pickle.loads(pickle.dumps(model)), _torch_roundtrip(model)):
        with torch.no_grad():
            got = restored(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert prefix_attn.integrations.transformers.is_enabled(restored)
        prefix_attn.disable(restored)
        assert not hasattr(restored, "prefix_attn") and not restored.base_model._forward_pre_hooks


def _torch_roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("projection", [False, True])
def test_save_pretrained_and_load_pretrained(tmp_path, projection):
    model, prefix = enabled("llama", projection=projection)
    model.eval()
    stock_keys = {k for k in model.state_dict() if not k.startswith("prefix_attn.")}
    model.save_pretrained(tmp_path, full_model=True)  # the default writes the prefix only: test_hf_checkpoints.py
    assert (tmp_path / "prefix.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert "prefix_attn" not in json.dumps(config)
    # a stock checkpoint: the stock class loads it with its default attention
    stock = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert stock.config._attn_implementation != "prefix_attn"
    assert set(stock.state_dict()) == stock_keys
    for k, v in stock.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], atol=0, rtol=0)
    # the documented call restores both
    ids, mask, _ = padded_batch()
    restored = prefix_attn.load_pretrained(tmp_path).eval()
    assert restored.prefix_attn.projection == projection
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert PrefixTuning.load(str(tmp_path)).num_virtual_tokens == P
    with pytest.raises(FileNotFoundError, match="prefix.safetensors"):
        stock.save_pretrained(tmp_path / "plain")
        prefix_attn.load_pretrained(tmp_path / "plain")


# ---------------------------------------------------------------------------------------------- PEFT models
@pytest.mark.parametrize("peft_type", ["prefix", "prompt", "lora"])
def test_enable_refuses_peft_models(peft_type):
    base = tiny_model("llama")
    cfg = {"prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
           "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
           "lora": peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])}[peft_type]
    pm = peft.get_peft_model(base, cfg)
    prefix = PrefixTuning(base.config, P)
    match = "get_base_model" if peft_type == "lora" else "from_peft"
    with pytest.raises(ValueError, match=match):
        prefix_attn.enable(pm, prefix)
    assert not hasattr(pm.get_base_model(), "prefix_attn")


# ---------------------------------------------------------------------------------------------- Trainer
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, length=10, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        for i in range(0, n, 3):
            self.mask[i, : 1 + i % 4] = 0  # left padding on every third row
        self.labels = self.ids.masked_fill(self.mask == 0, -100)
        self.labels[:, 0] = -100  # same token count with or without the causal shift

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-2,
                max_grad_norm=0.01, logging_steps=1, save_steps=3, save_strategy="steps", report_to=[],
                use_cpu=True, seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential",
                disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("projection", [False, True])
def test_trainer_equals_hand_written_loop(tmp_path, projection):
    data = _Rows()
    model, prefix = enabled(projection=projection)
    start = copy.deepcopy(prefix.state_dict())
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 6 and all(n > 0.01 for n in norms), norms  # real norms, above the clip threshold

    ref_model, ref_prefix = enabled(projection=projection)
    ref_prefix.load_state_dict(start)
    ref_model.train()
    params = list(ref_prefix.parameters())
    opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.0, fused=True)  # Trainer default: adamw_torch_fused
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, 6)
    ref_norms = []
    for step in range(6):
        batch = {k: torch.stack([data[i][k] for i in range(4 * step, 4 * step + 4)]) for k in data[0]}
        count = (batch["labels"][:, 1:] != -100).sum()  # Trainer's loss is sum / label count, as here
        loss = ref_model(**batch, num_items_in_batch=count).loss
        loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(params, 0.01).item())
        opt.step()
        sched.step()
        opt.zero_grad()
    for (name, got), want in zip(prefix.state_dict().items(), ref_prefix.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert (got - start[name]).abs().max() > 1e-3, "the prefix must have trained"
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), atol=1e-5, rtol=1e-5)

    # checkpoints hold the prefix: in the model weights (for resume) and in its own file
    ckpt = tmp_path / "checkpoint-3"
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {k for k in f.keys() if k.startswith("prefix_attn.")} == {f"prefix_attn.{k}" for k in start}
    assert PrefixTuning.load(str(ckpt)).projection == projection


def test_trainer_resume_is_bitwise(tmp_path):
    data = _Rows()
    model, prefix = enabled()
    transformers.Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=data).train()
    straight = prefix.prefix_kv.detach().clone()

    model, prefix = enabled(seed=11)  # another init: resume must overwrite it with checkpoint-3's
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "b"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    assert torch.equal(prefix.prefix_kv.detach(), straight)


def test_trainer_example_runs(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_prefix_trainer.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--pretrain-steps", "30", "--steps", "20"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bitwise equal to the straight run" in run.stdout
    assert (tmp_path / "final" / "prefix.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- compile
def _explain(model, **inputs):
    return torch._dynamo.explain(model)(**inputs)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compile_adds_no_graph_break(kind):
    stock = tiny_model(kind).eval()
    model, _ = enabled(kind)
    model.eval()
    ids, mask, _ = padded_batch()
    left = mask.clone()
    left[2] = 1  # left padding only
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": left}):
        torch._dynamo.reset()
        base = _explain(stock, use_cache=False, **inputs).graph_break_count
        torch._dynamo.reset()
        ours = _explain(model, use_cache=False, **inputs).graph_break_count
        assert ours <= base, (inputs.keys(), ours, base)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_compile_fullgraph_forward_backward(kind, padded):
    model, prefix = enabled(kind)
    model.train()
    ids, mask, labels = padded_batch()
    mask[2] = 1  # left padding (row 1) or none
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "use_cache": False}
    if padded:
        inputs["attention_mask"] = mask

    def loss_fn(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))

    loss_fn(model(**inputs).logits).backward()
    expected = prefix.prefix_kv.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_fn(compiled(**inputs).logits).backward()
    torch.testing.assert_close(prefix.prefix_kv.grad, expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_gloo_two_processes_equals_one_process(tmp_path, mode):
    from ddp_worker import run_two_ranks, single_process_grad

    out = tmp_path / "rank0.pt"
    run_two_ranks(str(out), mode, timeout=240)
    got = torch.load(out)
    torch.testing.assert_close(got["grad"], single_process_grad(), atol=1e-6, rtol=1e-5)
    assert got["trainable"] == ["prefix_attn.prefix_kv"]


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-v", *sys.argv[1:]]))
