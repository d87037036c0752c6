"""No host reads per layer on the GPU code path: the values fixed for a forward (a bank's ids and lengths, a packed
row's offsets, the key mask, the bank's row grouping for the backward) are resolved once per forward.

The GPU code path is the Triton backend (here under TRITON_INTERPRET=1, on CPU tensors); every read of a tensor
value from the package's or transformers' code is counted (``host_reads.py``) over one training step (forward and
backward) or one ``generate()``, for the same model at 2 and at 8 layers: the counts must be equal. On a GPU the
same steps run under ``torch.cuda.set_sync_debug_mode("error")`` with the reads the step makes once per forward
(the generate loop's, transformers' mask checks) allowed by count only where they occur outside the layers.
"""

import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from host_reads import HostReads  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixBank, PrefixTuning  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the Triton path needs a GPU or TRITON_INTERPRET=1 (make test sets it)")
warnings.filterwarnings("ignore", category=UserWarning)
VOCAB = 50


def tiny(kind, layers, device):
    torch.manual_seed(0)
    if kind == "gpt2":  # attention dropout on: the seed is drawn per layer, on the device
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=layers, n_head=2,
                                      attn_pdrop=0.1, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        return transformers.GPT2LMHeadModel(cfg).to(device)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).to(device)


def enabled(kind, layers, path, device):
    model = tiny(kind, layers, device)
    if path == "bank":
        prefix = PrefixBank([PrefixTuning(model.config, 3), PrefixTuning(model.config, 2)])
    else:
        prefix = PrefixTuning(model.config, 3)
    return prefix_attn.enable(model, prefix).train()


def batch(path, device):
    g = torch.Generator().manual_seed(1)
    if path == "packed":  # one row of three examples, position_ids restarting (DataCollatorWithFlattening)
        ids = torch.randint(3, VOCAB, (1, 9), generator=g)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
        return dict(input_ids=ids.to(device), position_ids=pos.to(device), labels=ids.to(device))
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=ids.masked_fill(mask == 0, -100)
              .to(device))
    if path == "bank":
        kw["prefix_ids"] = torch.tensor([1, 0], device=device)
    return kw


def train_step(model, kw):
    model.zero_grad()
    model(**kw).loss.backward()


def generate(model, kw):
    extra = {"prefix_ids": kw["prefix_ids"]} if "prefix_ids" in kw else {}
    with torch.no_grad():
        model.eval().generate(kw["input_ids"], attention_mask=kw["attention_mask"], max_new_tokens=2,
                              do_sample=False, pad_token_id=0, **extra)


def reads(kind, layers, path, run, device="cpu"):
    model = enabled(kind, layers, path, device)
    kw = batch(path, device)
    run(model, kw)  # first call: one-time work (registrations, per-device lengths, kernel caches)
    with HostReads() as counted:
        run(model, kw)
    return counted


# training: every path on both families; generate (no packing there): a bank on GPT-2, a shared prefix on Llama
CASES = ([(kind, path, train_step) for kind in ("gpt2", "llama") for path in ("shared", "bank", "packed")]
         + [("gpt2", "bank", generate), ("llama", "shared", generate)])


@pytest.mark.parametrize("kind,path,run", CASES, ids=[f"{k}-{p}-{r.__name__}" for k, p, r in CASES])
def test_no_host_reads_per_layer(kind, path, run, monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    two, eight = reads(kind, 2, path, run), reads(kind, 8, path, run)
    assert two.count == eight.count, (f"host reads grow with the layers: {two.count} at 2 layers, {eight.count} at "
                                      f"8; at 8: {dict(eight.where)}")
    package = {w: n for w, n in eight.where.items() if "prefix_attn" in w}
    assert all(n <= 2 for n in package.values()), package  # per forward: no line reads once per layer


def test_the_counter_counts():
    """The counter sees reads made from the package (a counter that saw none would pass the test above)."""
    from prefix_attn import checks

    t = torch.tensor([3, 1, 2])
    with HostReads() as counted:
        checks.min_max(t)
        checks.host_list(torch.tensor([0, 2]))
    assert counted.count == 2, dict(counted.where)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,path", [("gpt2", "shared"), ("gpt2", "bank"), ("llama", "bank"), ("llama", "packed")])
def test_no_sync_in_the_layers_on_gpu(kind, path):
    """On a GPU: a training step's layers and its whole backward run under set_sync_debug_mode("error"); what a
    forward resolves once (before its first layer) may synchronise."""
    model = enabled(kind, 4, path, "cuda")
    kw = batch(path, "cuda")
    train_step(model, kw)  # first call: one-time work
    layers = model.transformer.h if kind == "gpt2" else model.model.layers
    hooks = [layers[0].register_forward_pre_hook(lambda *a: torch.cuda.set_sync_debug_mode("error")),
             layers[-1].register_forward_hook(lambda *a: torch.cuda.set_sync_debug_mode("default"))]
    try:
        model.zero_grad()
        loss = model(**kw).loss
        torch.cuda.set_sync_debug_mode("error")
        loss.backward()
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for h in hooks:
            h.remove()
