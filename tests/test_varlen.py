"""prefix_attention_varlen (packed sequences) on every backend against the float64 reference (the padded reference
per sequence), under the 2x / 3x rule of prefix_grid.py; equivalences, strided inputs, determinism, errors."""

import os

import pytest
import torch
from prefix_grid import DTYPES, FLOOR, dtype_id

import prefix_attn
from prefix_attn.ops import _cpu_status
from prefix_attn.varlen import prefix_attention_varlen_reference

BACKENDS = ["torch"]
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")
if _cpu_status()[0] is not None:
    BACKENDS.append("cpu")

# (len_q per sequence, len_k per sequence, heads_kv, group, P, head_dim, bank entries)
CASES = [
    ([17], [17], 2, 1, 5, 16, 0),  # one sequence
    ([5, 0, 1, 17, 3], [7, 2, 1, 17, 9], 1, 4, 3, 16, 0),  # lengths 0 and 1, len_q < len_k
    ([0, 0], [0, 3], 2, 2, 1, 32, 0),  # nothing to attend from
    ([33, 1, 40, 7], [33, 1, 40, 7], 2, 2, 17, 24, 3),  # a bank, GQA 2
    ([9, 12, 1, 30, 2, 2, 5], [9, 20, 1, 30, 2, 4, 5], 1, 1, 0, 64, 0),  # many sequences, P = 0
]
IDS = [f"S{len(c[0])}-q{sum(c[0])}-k{sum(c[1])}-Hkv{c[2]}-G{c[3]}-P{c[4]}-D{c[5]}{'-bank' if c[6] else ''}"
       for c in CASES]


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def make(case, dtype, device, seed=0):
    lens_q, lens_k, hkv, group, P, D, entries = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    lead = (entries,) if entries else ()
    tensors = [rnd(sum(lens_q), hkv * group, D), rnd(sum(lens_k), hkv, D), rnd(sum(lens_k), hkv, D),
               rnd(*lead, hkv, P, D), rnd(*lead, hkv, P, D)]
    bank = {}
    if entries:
        bank = {"prefix_ids": torch.randint(0, entries, (len(lens_q),), generator=g).to(device),
                "prefix_lengths": torch.randint(0, P + 1, (entries,), generator=g).to(device)}
    return tensors, rnd(sum(lens_q), hkv * group, D), cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0), bank


def run(fn, tensors, dout, requires=(True,) * 5):
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(tensors, requires)]
    out = fn(*leaves)
    if any(requires):
        out.backward(dout.to(out.dtype))
    return [out.detach()] + [None if t.grad is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_varlen_matches_reference(backend, dtype, case):
    device = device_of(backend)
    tensors, dout, cu_q, cu_k, mq, mk, bank = make(case, dtype, device, seed=len(case[0]))
    got = run(lambda *t: prefix_attn.prefix_attention_varlen(*t, cu_q, cu_k, mq, mk, backend=backend, **bank),
              tensors, dout)
    want = run(lambda *t: prefix_attention_varlen_reference(*t, cu_q, cu_k, **bank), [t.double() for t in tensors],
               dout.double())
    plain = run(lambda *t: prefix_attention_varlen_reference(*t, cu_q, cu_k, compute_dtype=dtype, **bank), tensors,
                dout)
    for i, (g, w, p) in enumerate(zip(got, want, plain)):
        assert g.shape == w.shape and g.dtype == dtype
        if not w.numel():
            continue
        err, plain_err = (g.double() - w).abs().max().item(), (p.double() - w).abs().max().item()
        bound = (2.0 if i == 0 else 3.0) * plain_err + FLOOR[dtype] * max(1.0, w.abs().max().item())
        assert err <= bound, f"tensor {i}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_lengths_equal_the_padded_op(backend):
    device = device_of(backend)
    B, T, H, D = 3, 11, 2, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(3))
    pk, pv = (torch.randn(H, 4, D, generator=g).to(device) for _ in range(2))
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
    packed = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
    out = prefix_attn.prefix_attention_varlen(*packed, pk, pv, cu, cu, T, T, backend=backend)
    want = prefix_attn.prefix_attention(q, k, v, pk, pv, backend=backend).transpose(1, 2).reshape(B * T, H, D)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_strided_packed_views_partial_grads_and_determinism(backend):
    """q, k, v as views of one packed [total, 3, H, D] tensor (read in place); only k and the prefix need grad;
    two runs give the same bits."""
    device = device_of(backend)
    lens = [6, 1, 13]
    cu = torch.tensor([0, 6, 7, 20], dtype=torch.int32, device=device)
    qkv = torch.randn(20, 3, 2, 16, device=device)
    pk, pv = torch.randn(2, 5, 16, device=device), torch.randn(2, 5, 16, device=device)
    dout = torch.randn(20, 2, 16, device=device)

    def grads():
        leaves = [qkv.clone().requires_grad_(), pk.clone().requires_grad_(), pv.clone()]
        q, k, v = leaves[0][:, 0].detach(), leaves[0][:, 1], leaves[0][:, 2].detach()
        out = prefix_attn.prefix_attention_varlen(q, k, v, leaves[1], leaves[2], cu, cu, max(lens), max(lens),
                                                  backend=backend)
        out.backward(dout)
        return out.detach(), leaves[0].grad, leaves[1].grad

    a, b = grads(), grads()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref_leaves = [qkv[:, 1].double().requires_grad_(), pk.double().requires_grad_()]
    want = prefix_attention_varlen_reference(qkv[:, 0].double(), ref_leaves[0], qkv[:, 2].double(), ref_leaves[1],
                                             pv.double(), cu, cu)
    want.backward(dout.double())
    torch.testing.assert_close(a[0].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1][:, 1].double(), ref_leaves[0].grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(a[1][:, 0], torch.zeros_like(a[1][:, 0]))
    torch.testing.assert_close(a[2].double(), ref_leaves[1].grad, atol=1e-5, rtol=1e-5)


def test_varlen_gpu_tiles_under_the_interpreter():
    if "triton" not in BACKENDS:
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    from prefix_attn.triton import tuning

    tuning.gpu_tiles(True)
    try:
        test_varlen_matches_reference("triton", torch.float16, ([150, 3, 70], [200, 3, 129], 1, 2, 70, 64, 2))
    finally:
        tuning.gpu_tiles(False)


def test_varlen_compiles_without_graph_breaks():
    backend = "cpu" if "cpu" in BACKENDS else "torch"
    tensors, dout, cu_q, cu_k, mq, mk, _ = make(CASES[1], torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in tensors]

    def loss(*a):
        return prefix_attn.prefix_attention_varlen(*a, cu_q, cu_k, mq, mk, backend=backend).square().sum()

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), loss(*leaves))


def call(backend="torch", cu_q=None, cu_k=None, mq=17, mk=17, **kw):
    tensors, _, cq, ck, _, _, _ = make(CASES[1], torch.float32, "cpu")
    t = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), tensors))
    t.update({n: kw.pop(n) for n in list(kw) if n in t})
    return prefix_attn.prefix_attention_varlen(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                                               cq if cu_q is None else cu_q, ck if cu_k is None else cu_k, mq, mk,
                                               backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(cu_q=torch.tensor([1, 5, 5, 6, 23, 26], dtype=torch.int32)), ValueError, r"cu_seqlens_q must start at 0"),
    (dict(cu_k=torch.tensor([0, 7, 5, 10, 27, 36], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k must be non-decreasing"),
    (dict(cu_q=torch.tensor([0, 5, 5, 6, 23, 25], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 25 must be the total length 26 \(q.shape\[0\]\)"),
    (dict(cu_q=torch.tensor([0, 5, 5, 6, 23, 26], dtype=torch.float32)), TypeError, r"cu_seqlens_q must be int32"),
    (dict(cu_q=torch.tensor([0, 5, 5, 6, 23, 26], device="meta")), ValueError, r"cu_seqlens_q is on meta"),
    (dict(cu_q=torch.tensor([0, 8, 8, 9, 25, 26], dtype=torch.int32)), ValueError,
     r"sequence 0 has len_q = 8 > len_k = 7"),
    (dict(mq=10), ValueError, r"max_seqlen_q = 10 is smaller than the longest sequence \(17\)"),
    (dict(cu_k=torch.tensor([0, 7, 9, 10, 36], dtype=torch.int32)), ValueError, r"must have the same length"),
    (dict(q=torch.randn(26, 4, 2, 16)), ValueError, r"q must be \[total_q, heads_q, head_dim\] \(rank 3, packed\)"),
    (dict(mq=17.0), TypeError, r"max_seqlen_q must be an int"),
])
def test_varlen_bad_input(backend, kw, exc, pattern):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the inputs here are CPU tensors")
    with pytest.raises(exc, match=pattern):
        call(backend=backend, **kw)
