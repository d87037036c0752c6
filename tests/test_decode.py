"""The decode path (prefix_attn/decode.py): few queries per row, no gradient. Its output must meet the grid's rule
against the float64 reference (2x plain PyTorch's own error at that precision), on every backend, and the path must
be the one taken (generate() takes it with no option)."""

import os

import pytest
import torch
from prefix_grid import FLOOR, Case, case_args, dtype_id, make_inputs, reference_fn

from prefix_attn import decode, ops, prefix_attention

# len_q 1 and 16; GQA 1 / 4 / 8; P = 1, odd, larger than a block; padding (one row down to a single key); softcap;
# a bank with unused entries, per-entry lengths (0 included) and every row on one entry; non-causal
DECODE_GRID = [
    Case(8, 2, 1, 1, 17, 5, 16, masked=True),
    Case(4, 1, 4, 1, 33, 40, 32),
    Case(2, 1, 8, 16, 40, 33, 64, masked=True),
    Case(9, 2, 1, 16, 16, 1, 16),
    Case(8, 2, 2, 1, 20, 7, 24, softcap=2.5),
    Case(8, 1, 2, 1, 17, 5, 16, entries=4, masked=True),
    Case(6, 2, 4, 3, 20, 9, 16, entries=3, lengths=True),
    Case(8, 1, 1, 1, 13, 4, 16, entries=2, ids="same"),
    Case(4, 2, 4, 4, 13, 6, 32, causal=False, masked=True),
]
BACKENDS = ["cpu", "triton"]


def _backend_ok(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} backend unavailable")


def _spy(monkeypatch, backend="cpu"):
    """A list that grows by one at each call of the backend's decode path (Triton: split-KV, ``split_forward``)."""
    taken = []
    name = "split_forward" if backend == "triton" else "forward"
    real = getattr(decode, name)
    monkeypatch.setattr(decode, name, lambda *a, **kw: taken.append(1) or real(*a, **kw))
    return taken


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", DECODE_GRID, ids=str)
def test_decode_grid(case, dtype, backend, monkeypatch):
    _backend_ok(backend)
    monkeypatch.setattr(decode, "DECODE_MIN_ROWS", 1)  # every case on the path (the thresholds are a speed rule)
    monkeypatch.setattr(decode, "DECODE_MIN_READERS", 1)
    taken = _spy(monkeypatch, backend)
    q, k, v, pk, pv, mask, _ = make_inputs(case, dtype)
    extra = case_args(case)
    cap = {"softcap": case.softcap} if case.softcap else {}
    with torch.no_grad():
        got = prefix_attention(q, k, v, pk, pv, causal=case.causal, attention_mask=mask, backend=backend,
                               **extra, **cap)
        want = reference_fn(torch.float64, case.softcap, **extra)(*(t.double() for t in (q, k, v, pk, pv)),
                                                                  causal=case.causal, attention_mask=mask)
        plain = reference_fn(dtype, case.softcap, **extra)(q, k, v, pk, pv, causal=case.causal,
                                                           attention_mask=mask)
    assert taken, "the decode path was not taken"
    assert got.dtype == dtype and got.shape == q.shape and torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    bound = 2.0 * (plain.double() - want).abs().max().item() + FLOOR[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"{case} {dtype_id(dtype)}: max error {err:.3e} > bound {bound:.3e}"


def test_decode_path_only_without_gradients_and_dropout(monkeypatch):
    monkeypatch.setattr(decode, "DECODE_MIN_READERS", 1)  # the speed rule aside
    case = DECODE_GRID[0]
    q, k, v, pk, pv, mask, _ = make_inputs(case, torch.float32)
    taken = _spy(monkeypatch)
    pk.requires_grad_(True)
    out = prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="cpu")
    assert not taken and out.requires_grad  # training: the fused kernels (one backward for all five inputs)
    with torch.no_grad():
        prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="cpu", dropout_p=0.1, dropout_seed=3)
        assert not taken
        prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="cpu")
        assert taken
    long_q = torch.randn(case.batch, case.heads_q, decode.DECODE_MAX_LEN_Q + 1, case.head_dim)
    k2 = torch.randn(case.batch, case.heads_kv, decode.DECODE_MAX_LEN_Q + 1, case.head_dim)
    taken.clear()
    with torch.no_grad():
        prefix_attention(long_q, k2, k2, pk, pv, backend="cpu")
    assert not taken


def test_fully_padded_rows_without_prefix_entry_output_zeros():
    """A bank row on an empty entry whose text keys are all padded sees no key: zeros, as the kernels give."""
    q = torch.randn(8, 2, 1, 16)
    k, v = torch.randn(8, 2, 5, 16), torch.randn(8, 2, 5, 16)
    pk, pv = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[3] = False
    ids = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    lengths = torch.tensor([3, 0], dtype=torch.int32)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_ids=ids, prefix_lengths=lengths,
                               backend="cpu")
        fused = ops.PrefixAttentionFunction.apply(q, k, v, pk, pv, mask, ids, lengths, None, None, 0, 0, True,
                                                  16**-0.5, 0.0, 0.0, None, "cpu")
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out, fused, atol=1e-6, rtol=1e-5)


def test_one_prefix_ids_tensor_with_banks_of_different_sizes():
    """The bank's row plan is kept per prefix_ids tensor; the same ids with a larger bank (entries unused) still
    equal the fused kernel."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(8, 2, 1, 16, generator=g)
    k, v = torch.randn(8, 2, 9, 16, generator=g), torch.randn(8, 2, 9, 16, generator=g)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    for entries in (2, 4):
        pk, pv = torch.randn(entries, 2, 5, 16, generator=g), torch.randn(entries, 2, 5, 16, generator=g)
        with torch.no_grad():
            out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend="cpu")
            fused = ops.PrefixAttentionFunction.apply(q, k, v, pk, pv, None, ids, None, None, None, 0, 0, True,
                                                      16**-0.5, 0.0, 0.0, None, "cpu")
        torch.testing.assert_close(out, fused, atol=1e-6, rtol=1e-5)


def test_inference_under_a_dispatch_mode_goes_through_the_custom_op():
    """Eager inference calls the launcher directly, except where a dispatch mode (a FLOP counter, a tracer) or a
    tensor subclass must see the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, pk, pv = (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                       torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    with torch.no_grad():
        want = prefix_attention(q, k, v, pk, pv, backend="cpu")
        with Record():
            got = prefix_attention(q, k, v, pk, pv, backend="cpu")
    assert any("prefix_attn.fwd" in name for name in seen), seen
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_decode_step_reads_no_host_values(backend, monkeypatch):
    """A shared prefix's decode step reads no tensor value on the host (on a GPU: no synchronisation, nothing that
    stops a CUDA graph from capturing it)."""
    _backend_ok(backend)
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from host_reads import HostReads

    taken = _spy(monkeypatch, backend)
    q, k, v = torch.randn(8, 4, 1, 16), torch.randn(8, 2, 9, 16), torch.randn(8, 2, 9, 16)
    pk, pv = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = torch.ones(8, 9, dtype=torch.bool)
    mask[2, :4] = False
    with torch.no_grad():
        prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend=backend)  # one-time work
        with HostReads() as counted:
            prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend=backend)
    assert taken and counted.count == 0, dict(counted.where)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads_q,heads_kv", [(12, 12), (32, 8)])
def test_decode_step_is_captured_by_a_cuda_graph(heads_q, heads_kv):
    """On a GPU: a decode step (len_q = 1, shared prefix, padded cache) captured in a CUDA graph and replayed on new
    inputs equals the eager step."""
    dev = torch.device("cuda")
    B, T, P, D = 32, 64, 96, 64

    def fresh():
        return (torch.randn(B, heads_q, 1, D, device=dev, dtype=torch.bfloat16),
                torch.randn(B, heads_kv, T, D, device=dev, dtype=torch.bfloat16),
                torch.randn(B, heads_kv, T, D, device=dev, dtype=torch.bfloat16))

    pk = torch.randn(heads_kv, P, D, device=dev, dtype=torch.bfloat16)
    pv = torch.randn(heads_kv, P, D, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask[1, :10] = False
    q, k, v = fresh()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (compilation, caches)
                prefix_attention(q, k, v, pk, pv, attention_mask=mask)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = prefix_attention(q, k, v, pk, pv, attention_mask=mask)
        for _ in range(2):
            nq, nk, nv = fresh()
            q.copy_(nq), k.copy_(nk), v.copy_(nv)
            graph.replay()
            torch.cuda.synchronize()
            eager = prefix_attention(q, k, v, pk, pv, attention_mask=mask)
            torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_generate_takes_the_decode_path(monkeypatch):
    """generate() on a batch sharing a prefix takes the decode path with no option, and its tokens equal the fused
    kernel's."""
    transformers = pytest.importorskip("transformers")
    import prefix_attn

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    model = prefix_attn.enable(transformers.GPT2LMHeadModel(cfg), prefix_attn.PrefixTuning(cfg, 6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 1.0)
    ids = torch.randint(3, 40, (16, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[3, :2] = 0
    taken = _spy(monkeypatch)
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, **kw)
        assert taken, "generate() did not take the decode path"
        monkeypatch.setattr(decode, "DECODE_MIN_ROWS", 10**9)
        taken.clear()
        want = model.generate(ids, **kw)
    assert not taken and torch.equal(got, want)
