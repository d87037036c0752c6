"""Mixed precision: the ops follow torch.autocast as SDPA does, and autocast training matches PEFT's.

Under autocast, rotary-position models hand attention float32 q/k (RoPE promotes them) and a 16-bit v; the ops
cast q, k, v and the prefix to the autocast dtype (differentiably: each gradient returns in its input's dtype)
and run the kernels there. The error against float64 must stay within the 2x/3x rule of plain PyTorch's
(expand + concat + SDPA under the same autocast).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import prefix_attn
from prefix_attn.ops import _cpu_status
from prefix_attn.reference import prefix_attention_reference

BACKENDS = ["torch"]
if _cpu_status()[0] is not None:
    BACKENDS.append("cpu")
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    BACKENDS.append("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed=0, B=2, Hq=4, Hkv=2, T=19, D=32, P=5):
    g = torch.Generator().manual_seed(seed)

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()

    # what a RoPE layer under autocast passes: float32 q and k, bfloat16 v; the prefix parameter in float32
    return [r(B, Hq, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D, dtype=torch.bfloat16), r(Hkv, P, D), r(Hkv, P, D)]


def _sdpa(q, k, v, pk, pv):
    """Plain PyTorch: expand + concat + SDPA (GQA through repeat_interleave), bottom-right causal mask."""
    B, group = q.shape[0], q.shape[1] // k.shape[1]
    keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    P, T = pk.shape[1], k.shape[2]
    visible = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(P)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def _run(fn, leaves, dout, autocast=True):
    for t in leaves:
        t.grad = None
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_follows_autocast_like_sdpa(backend):
    leaves = _inputs()
    dout = torch.randn(2, 4, 19, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = _run(lambda *a: prefix_attn.prefix_attention(*a, backend=backend), leaves, dout)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]  # the prefix gradient in float32, v's in bf16
    plain, plain_grads = _run(_sdpa, leaves, dout)
    assert plain.dtype == torch.bfloat16
    # float64 oracle on the values autocast hands the op (cast to bfloat16 first)
    as64 = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in leaves]
    ref = prefix_attention_reference(*as64)
    ref.backward(dout.double())
    for i, (got, base, want) in enumerate(zip([out] + grads, [plain] + plain_grads, [ref] + [t.grad for t in as64])):
        err = (got.double() - want).abs().max().item()
        plain_err = (base.double() - want).abs().max().item()
        bound = (2.0 if i == 0 else 3.0) * plain_err + 1.6e-2 * max(1.0, want.abs().max().item())
        assert err <= bound, (i, err, plain_err)


def test_varlen_follows_autocast():
    q, k, v, pk, pv = _inputs(T=12)
    tq = q.detach()[0].transpose(0, 1).contiguous().requires_grad_()  # [total=12, Hq, D] float32
    tk = k.detach()[0].transpose(0, 1).contiguous().requires_grad_()
    tv = v.detach()[0].transpose(0, 1).contiguous().requires_grad_()  # bfloat16
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = prefix_attn.prefix_attention_varlen(tq, tk, tv, pk, pv, cu, cu, 7, 7)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert tq.grad.dtype == torch.float32 and tv.grad.dtype == torch.bfloat16 and pk.grad.dtype == torch.float32
    # the same as passing bfloat16 copies outside autocast
    casts = [t.detach().to(torch.bfloat16) for t in (tq, tk, tv, pk, pv)]
    torch.testing.assert_close(out, prefix_attn.prefix_attention_varlen(*casts, cu, cu, 7, 7), atol=0, rtol=0)


def test_mixed_dtypes_outside_autocast_still_refused():
    q, k, v, pk, pv = _inputs()
    with pytest.raises(TypeError, match="share one dtype"):
        prefix_attn.prefix_attention(q, k, v, pk, pv)


def test_compiled_under_autocast_matches_eager():
    leaves = _inputs(seed=3)
    dout = torch.randn(2, 4, 19, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def fn(*a):
        return prefix_attn.prefix_attention(*a)

    eager, eager_grads = _run(fn, leaves, dout)
    torch._dynamo.reset()
    compiled, compiled_grads = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), leaves, dout)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_hf_families as fam  # noqa: E402

AUTOCAST_FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "phi", "gpt_neox"]


def _train_step(m, grad_of, autocast):
    ids, mask, labels = fam.padded_batch()
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # no cache, as in training (a DynamicCache would promote the bfloat16 v to float32 in its concatenation)
        out = m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach().float(), grad_of().clone()


@pytest.mark.parametrize("name", AUTOCAST_FAMILIES)
def test_autocast_train_step_matches_peft(name):
    pm, ours, prefix = fam.peft_and_ours(name)
    pm.train()
    ours.train()

    def peft_grad():
        g = pm.prompt_encoder["default"].embedding.weight.grad
        return prefix_attn.PrefixTuning._kv_from_peft_embeddings(g, prefix.shape, fam.P)

    loss32, grad32 = _train_step(pm, peft_grad, autocast=False)  # the float32 truth
    loss_peft, grad_peft = _train_step(pm, peft_grad, autocast=True)
    loss_ours, grad_ours = _train_step(ours, lambda: prefix.prefix_kv.grad, autocast=True)
    assert prefix.prefix_kv.grad.dtype == torch.float32
    # within bf16 reach of PEFT under the same autocast: no worse than 3x its own error against float32
    assert abs(loss_ours - loss32) <= 3 * abs(loss_peft - loss32) + 2e-3 * abs(loss32), (loss_ours, loss_peft, loss32)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(grad_ours, grad32) <= 3 * rel(grad_peft, grad32) + 1e-2, (rel(grad_ours, grad32), rel(grad_peft, grad32))


def test_trainer_bf16_trains(tmp_path):
    import test_hf_training as tr

    model, prefix = tr.enabled("llama")  # RoPE: float32 q/k, bfloat16 v under autocast
    start = prefix.prefix_kv.detach().clone()
    trainer = transformers.Trainer(model=model, args=tr._args(tmp_path, bf16=True, max_steps=3, save_steps=10),
                                   train_dataset=tr._Rows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(prefix.prefix_kv.detach(), start) and prefix.prefix_kv.dtype == torch.float32
    assert copy.deepcopy(model) is not None
