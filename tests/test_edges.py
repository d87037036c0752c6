"""Plain attention's behaviour at the edges, on every backend: NaN and +-inf propagate as they do in plain float64
attention over the visible keys (forward, backward, the decode paths, a model's loss), any finite softmax_scale
gives the reference's values, and an integer attention_mask holds only 0 and 1 (anything else is refused by name).

The oracle of the non-finite tests is attention written out per query over the keys that query sees, in float64
(``visible_attention``): an output or gradient it makes non-finite must be non-finite on every backend, and where
both are finite they agree. A masked key's NaN need not show, and a backend may spread a NaN further than the oracle
only as far as plain attention on the expanded and concatenated keys does (outputs: the reference's ``0 * NaN``).
"""

from __future__ import annotations

import os

import pytest
import torch

import prefix_attn
from prefix_attn import cpu as cpu_backend
from prefix_attn import decode
from prefix_attn.reference import prefix_attention_reference

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = {"cpu": "cpu", "torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu"}
NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def backend_param(name):
    marks = []
    if name == "triton":
        marks.append(pytest.mark.skipif(not TRITON_OK, reason="needs a CUDA GPU or TRITON_INTERPRET=1"))
    if name == "cpu":
        marks.append(pytest.mark.skipif(not cpu_backend.is_available()[0], reason="native CPU kernel not built"))
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [backend_param(b) for b in ("cpu", "triton", "torch")]


def make(batch, heads_kv, group, len_q, len_k, num_prefix, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return [rand(batch, heads_kv * group, len_q, head_dim), rand(batch, heads_kv, len_k, head_dim),
            rand(batch, heads_kv, len_k, head_dim), rand(heads_kv, num_prefix, head_dim),
            rand(heads_kv, num_prefix, head_dim)]


def visible_attention(q, k, v, pk, pv, *, causal, scale, mask):
    """Plain attention, one query at a time over exactly the keys it sees (prefix, then visible text), in the
    inputs' dtype; differentiable. -> [B, Hq, Tq, D]."""
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    rows = []
    for b in range(batch):
        heads = []
        for h in range(heads_q):
            kv = h // group
            outs = []
            for i in range(len_q):
                seen = [j for j in range(len_k) if (not causal or j <= len_k - len_q + i)
                        and (mask is None or bool(mask[b, j]))]
                keys = torch.cat([pk[kv], k[b, kv, seen]])
                values = torch.cat([pv[kv], v[b, kv, seen]])
                # a key scored -inf weighs exactly 0, as if masked (its 0 * inf in dQ need not show)
                with torch.no_grad():
                    live = (keys @ q[b, h, i]) * scale != float("-inf")
                if not live.any():
                    outs.append(q.new_zeros(head_dim))
                    continue
                outs.append(torch.softmax((keys[live] @ q[b, h, i]) * scale, 0) @ values[live])
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def compare(name, got, want, upper=None, atol=2e-4, rtol=2e-3):
    """Non-finite wherever ``want`` is; the finite entries of both close; non-finite only where ``upper`` is."""
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    hidden = bad_want & ~bad_got
    assert not hidden.any(), f"{name}: finite at {hidden.nonzero()[:4].tolist()} where plain attention is not"
    both = ~bad_got & ~bad_want
    torch.testing.assert_close(got[both].double(), want[both].double(), atol=atol, rtol=rtol, msg=name)
    if upper is not None:
        extra = bad_got & torch.isfinite(upper)
        assert not extra.any(), f"{name}: non-finite at {extra.nonzero()[:4].tolist()}, plain attention is finite"


POISON = {  # a place of each input seen by some queries (causal) of batch row 0
    "q": (0, 1, -1, 3), "k": (0, 0, 2, 5), "v": (0, 0, 2, 5), "prefix_k": (0, 1, 5), "prefix_v": (0, 1, 5),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_propagates(backend, which, value):
    scale = 0.3
    x = make(2, 2, 2, 5, 5, 3, 16, seed=NAMES.index(which))
    x[NAMES.index(which)][POISON[which]] = value
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False
    dev = DEVICE[backend]
    xs = [t.detach().to(dev, copy=True).requires_grad_() for t in x]
    out = prefix_attn.prefix_attention(*xs, softmax_scale=scale, attention_mask=mask.to(dev), backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(dout.to(dev))
    x64 = [t.detach().double().requires_grad_() for t in x]
    want = visible_attention(*x64, causal=True, scale=scale, mask=mask)
    want.backward(dout.double())
    with torch.no_grad():
        upper = prefix_attention_reference(*[t.double() for t in x], softmax_scale=scale, attention_mask=mask)
    compare("out", out.cpu(), want.detach(), upper)
    for name, a, b in zip(NAMES, xs, x64):
        compare(f"d{name}", a.grad.cpu(), b.grad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_propagates_when_decoding(backend, which, value):
    """The decode paths (few queries, no gradient): the CPU's merge of two calls, Triton's split-KV."""
    x = make(4, 1, 4, 1, 6, 3, 16, seed=NAMES.index(which))
    poison = (0, 1, 0, 3) if which == "q" else POISON[which]
    x[NAMES.index(which)][poison] = value
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, :2] = False
    if backend != "torch":
        assert decode.applies(x[0], x[3], x[4], False, 0.0, False, backend)
    dev = DEVICE[backend]
    with torch.no_grad():
        out = prefix_attn.prefix_attention(*[t.to(dev) for t in x], attention_mask=mask.to(dev), backend=backend)
        want = visible_attention(*[t.double() for t in x], causal=True, scale=16**-0.5, mask=mask)
        upper = prefix_attention_reference(*[t.double() for t in x], attention_mask=mask)
    compare("out", out.cpu(), want, upper)


# ---------------------------------------------------------------------------------------------- softmax_scale
SCALES = [-1.0, -0.25, 0.0, 1e-6, 50.0]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("variant", ["causal-mask", "full-softcap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_finite_scale(backend, variant, scale):
    causal, softcap = (True, 0.0) if variant == "causal-mask" else (False, 2.0)
    x = make(2, 1, 2, 7, 9, 3, 16, seed=3)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    dev = DEVICE[backend]
    xs = [t.detach().to(dev, copy=True).requires_grad_() for t in x]
    kw = dict(causal=causal, softmax_scale=scale, softcap=softcap, attention_mask=mask)
    out = prefix_attn.prefix_attention(*xs, **{**kw, "attention_mask": mask.to(dev)}, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(dout.to(dev))
    x64 = [t.detach().double().requires_grad_() for t in x]
    want = prefix_attention_reference(*x64, **kw)
    want.backward(dout.double())

    def close(name, got, ref, tol):
        err = (got.cpu().double() - ref).abs().max().item()
        assert err <= tol * (1.0 + ref.abs().max().item()), f"{name}: max error {err:.3g} at softmax_scale={scale}"

    close("out", out.detach(), want.detach(), 2e-5)
    for name, a, b in zip(NAMES, xs, x64):
        close(f"d{name}", a.grad, b.grad, 2e-4)


@pytest.mark.parametrize("scale", [-1.0, -0.25, 0.0, 50.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_finite_scale_when_decoding(backend, scale):
    x = make(4, 1, 4, 2, 7, 5, 16, seed=4)
    if backend != "torch":
        assert decode.applies(x[0], x[3], x[4], False, 0.0, False, backend)
    dev = DEVICE[backend]
    with torch.no_grad():
        out = prefix_attn.prefix_attention(*[t.to(dev) for t in x], softmax_scale=scale, backend=backend)
    want = prefix_attention_reference(*[t.double() for t in x], softmax_scale=scale)
    err = (out.cpu().double() - want).abs().max().item()
    assert err <= 2e-5 * (1.0 + want.abs().max().item()), f"max error {err:.3g} at softmax_scale={scale}"


# ---------------------------------------------------------------------------------------------- attention_mask
@pytest.mark.parametrize("bad,dtype", [(2, torch.int64), (-1, torch.int32), (3, torch.uint8)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_values_other_than_0_and_1_are_refused(backend, bad, dtype):
    x = make(2, 1, 1, 4, 4, 2, 8)
    dev = DEVICE[backend]
    x = [t.to(dev) for t in x]
    mask = torch.ones(2, 4, dtype=dtype, device=dev)
    mask[1, 0] = 0
    ok = prefix_attn.prefix_attention(*x, attention_mask=mask, backend=backend)
    assert torch.equal(ok, prefix_attn.prefix_attention(*x, attention_mask=mask.bool(), backend=backend))
    mask[0, 2] = bad  # in place: the memoised check reads the changed tensor again
    with pytest.raises(ValueError, match=f"attention_mask must be bool or hold only 0 and 1, got {bad}"):
        prefix_attn.prefix_attention(*x, attention_mask=mask, backend=backend)


def _tiny_gpt2(num_prefix=4):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg)
    prefix = prefix_attn.PrefixTuning(model.config, num_prefix, init="normal", init_std=0.5)
    return prefix_attn.enable(model, prefix), prefix


def test_model_mask_values_other_than_0_and_1_are_refused():
    model, _ = _tiny_gpt2()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    model(input_ids=ids, attention_mask=mask)
    for bad in (2, -1):
        wrong = mask.clone()
        wrong[0, 3] = bad
        with pytest.raises(ValueError, match=f"attention_mask must be bool or hold only 0 and 1, got {bad}"):
            model(input_ids=ids, attention_mask=wrong)


# ---------------------------------------------------------------------------------------------- end to end
def test_nan_in_a_prefix_makes_the_loss_nan():
    """A GPT-2 whose prefix holds one NaN key trains on a NaN loss and NaN prefix gradients, as with plain attention
    (an fp16 GradScaler then skips the step), not on a finite loss while AdamW spreads the NaN."""
    model, prefix = _tiny_gpt2()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss)
    with torch.no_grad():
        prefix.prefix_kv[0, 0, 0, 1, 2] = float("nan")  # layer 0, keys, head 0, slot 1
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isnan(loss)
    loss.backward()
    assert not torch.isfinite(prefix.prefix_kv.grad).all()
