"""A bank of prefixes chosen per row (prefix_ids, prefix_lengths): errors, equivalences and properties on every
backend. The float64-reference grid for the bank is BANK_GRID in prefix_grid.py (test_triton, test_cpu_backend)."""

import os

import pytest
import torch

import prefix_attn
from prefix_attn.ops import _cpu_status

BACKENDS = ["torch"]
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")
if _cpu_status()[0] is not None:
    BACKENDS.append("cpu")


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def inputs(B=4, Hq=4, Hkv=2, Tq=9, Tk=11, P=5, D=16, N=3, device="cpu", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    return (rnd(B, Hq, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, D), rnd(N, Hkv, P, D), rnd(N, Hkv, P, D))


def grads_of(backend, q, k, v, pk, pv, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prefix_attn.prefix_attention(*leaves, backend=backend, **kw)
    out.backward(torch.ones_like(out) * 0.1 + out.detach())
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_on_one_entry_equals_the_shared_prefix(backend):
    device = device_of(backend)
    q, k, v, pk, pv = inputs(device=device)
    ids = torch.full((4,), 1, device=device)
    bank = grads_of(backend, q, k, v, pk, pv, prefix_ids=ids)
    shared = grads_of(backend, q, k, v, pk[1], pv[1])
    for a, b in zip(bank[:4], shared[:4]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    for a, b in zip(bank[4:], shared[4:]):
        torch.testing.assert_close(a[1], b, atol=2e-6, rtol=2e-6)
        assert torch.equal(a[0], torch.zeros_like(a[0])) and torch.equal(a[2], torch.zeros_like(a[2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_gradient_is_the_sum_of_its_rows(backend):
    """Entry n's gradient equals the sum over the rows that chose it, each run alone on the shared path."""
    device = device_of(backend)
    q, k, v, pk, pv = inputs(device=device, seed=3)
    ids = torch.tensor([2, 0, 2, 2], device=device)
    lengths = torch.tensor([5, 4, 3], device=device)
    got = grads_of(backend, q, k, v, pk, pv, prefix_ids=ids, prefix_lengths=lengths)
    want_k = torch.zeros_like(pk)
    for b in range(4):
        n, L = int(ids[b]), int(lengths[ids[b]])
        alone = grads_of(backend, q[b:b + 1], k[b:b + 1], v[b:b + 1], pk[n, :, :L], pv[n, :, :L])
        torch.testing.assert_close(got[0][b:b + 1], alone[0], atol=2e-6, rtol=2e-6)
        want_k[n, :, :L] += alone[4]
    torch.testing.assert_close(got[4], want_k, atol=5e-6, rtol=5e-6)
    assert torch.equal(got[4][2, :, 3:], torch.zeros_like(got[4][2, :, 3:]))  # slots past the length
    assert torch.equal(got[4][1], torch.zeros_like(got[4][1]))  # an entry no row chose


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_bank_backward_is_deterministic(backend):
    device = device_of(backend)
    q, k, v, pk, pv = inputs(B=6, Tq=40, Tk=40, device=device, seed=5)
    ids = torch.tensor([1, 0, 1, 2, 1, 0], device=device)
    a = grads_of(backend, q, k, v, pk, pv, prefix_ids=ids)
    b = grads_of(backend, q, k, v, pk, pv, prefix_ids=ids)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_bank_strided_views_and_partial_grads(backend):
    """A bank that is a view (every other entry of a larger tensor, slots transposed in) and only the bank
    requiring grad."""
    device = device_of(backend)
    q, k, v, pk, pv = inputs(device=device, seed=8)
    big = torch.randn(6, 5, 2, 16, device=device)  # [2N, P, Hkv, D]
    view_k = big[::2].transpose(1, 2)  # [N, Hkv, P, D], non-contiguous
    view_v = big[1::2].transpose(1, 2)
    ids = torch.tensor([0, 2, 2, 1], device=device)
    leaves = [view_k.detach().clone().requires_grad_(), view_v.detach().clone().requires_grad_()]
    assert not leaves[0].is_contiguous()  # clone keeps the strided layout
    out = prefix_attn.prefix_attention(q, k, v, *leaves, prefix_ids=ids, backend=backend)
    ref = prefix_attn.prefix_attention(q, k, v, view_k.contiguous(), view_v.contiguous(), prefix_ids=ids,
                                       backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    out.square().sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (view_k, view_v)]
    prefix_attn.prefix_attention(q, k, v, *ref_leaves, prefix_ids=ids, backend="torch").square().sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=5e-6, rtol=5e-6)


def test_bank_compiles_without_graph_breaks():
    backend = "cpu" if "cpu" in BACKENDS else "torch"
    q, k, v, pk, pv = inputs()
    ids = torch.tensor([0, 2, 1, 2])
    lengths = torch.tensor([5, 2, 4], dtype=torch.int32)
    args = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]

    def loss(*a):
        return prefix_attn.prefix_attention(*a, prefix_ids=ids, prefix_lengths=lengths, backend=backend).square().sum()

    torch._dynamo.reset()
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, loss(*args))


def bank_call(**kw):
    q, k, v, pk, pv = inputs()
    args = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    args.update({n: kw.pop(n) for n in list(kw) if n in args})
    return prefix_attn.prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(prefix_ids=torch.tensor([0, 1, 3, 0])), ValueError, r"prefix_ids must be in \[0, num_entries=3\)"),
    (dict(prefix_ids=torch.tensor([0, -1, 2, 0])), ValueError, r"prefix_ids must be in \[0, num_entries=3\)"),
    (dict(prefix_ids=torch.tensor([0, 1, 2])), ValueError, r"prefix_ids must be \[batch=4\]"),
    (dict(prefix_ids=torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, r"prefix_ids must be an int32 or int64"),
    (dict(prefix_ids=[0, 1, 2, 0]), TypeError, r"prefix_ids must be an integer torch.Tensor"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0]), prefix_lengths=torch.tensor([5, 6, 1])), ValueError,
     r"prefix_lengths must be in \[0, num_prefix=5\]"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0]), prefix_lengths=torch.tensor([5, -1, 1])), ValueError,
     r"prefix_lengths must be in \[0, num_prefix=5\]"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0]), prefix_lengths=torch.tensor([5, 1])), ValueError,
     r"prefix_lengths must be \[num_entries=3\]"),
    (dict(prefix_lengths=torch.tensor([5, 1, 1])), ValueError, r"prefix_k has rank 4 .* pass prefix_ids"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0]), prefix_k=torch.randn(2, 5, 16), prefix_v=torch.randn(2, 5, 16)),
     ValueError, r"with prefix_ids, prefix_k must be a bank \[num_entries, heads_kv, num_prefix, head_dim\]"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0]), prefix_v=torch.randn(4, 2, 5, 16)), ValueError,
     r"prefix_k and prefix_v must have the same shape"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0]), prefix_k=torch.randn(3, 1, 5, 16), prefix_v=torch.randn(3, 1, 5, 16)),
     ValueError, r"prefix_k must be \[num_entries, heads_kv=2, num_prefix, head_dim=16\]"),
    (dict(prefix_ids=torch.tensor([0, 1, 2, 0], device="meta")), ValueError, r"prefix_ids is on meta but q is on"),
])
def test_bank_bad_input(backend, kw, exc, pattern):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the inputs here are CPU tensors")
    with pytest.raises(exc, match=pattern):
        bank_call(backend=backend, **kw)
