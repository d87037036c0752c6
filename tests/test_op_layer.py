"""The op layer's own bookkeeping: shape checks memoised per signature (never skipping a check for arguments that
differ from one that passed, never keeping a failure), and the autograd Function reaching the custom ops below their
autograd kernel in eager mode (still visible to dispatch modes)."""

import pytest
import torch

import prefix_attn
from prefix_attn import checks


def tensors(B=2, Hq=4, Hkv=2, Tq=5, Tk=7, P=3, D=8, dtype=torch.float32, requires_grad=False):
    shapes = dict(q=(B, Hq, Tq, D), k=(B, Hkv, Tk, D), v=(B, Hkv, Tk, D), prefix_k=(Hkv, P, D), prefix_v=(Hkv, P, D))
    return {name: torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad) for name, shape in shapes.items()}


def call(backend="torch", **overrides):
    args = tensors()
    kwargs = {name: overrides.pop(name) for name in list(overrides) if name not in args}
    args.update(overrides)
    return prefix_attn.prefix_attention(**args, backend=backend, **kwargs)


def test_checks_run_once_per_signature(monkeypatch):
    runs = []
    check = checks._check_padded
    monkeypatch.setattr(checks, "_check_padded", lambda *a: runs.append(1) or check(*a))
    args = tensors(Tq=2, Tk=11, P=6)  # a signature no other test uses
    for _ in range(3):
        prefix_attn.prefix_attention(**args, backend="torch")
    prefix_attn.prefix_attention(**tensors(Tq=2, Tk=11, P=6), backend="torch")  # other tensors, same signature
    assert len(runs) == 1
    prefix_attn.prefix_attention(**args, causal=False, backend="torch")
    assert len(runs) == 2


def test_a_remembered_signature_refuses_every_argument_that_differs():
    """After a call passed (its signature remembered), a call that differs in one type, dtype, device, shape or scalar
    the checks read is checked again; a failing one fails every time (failures are never remembered)."""
    call()
    call()
    call(softcap=1)
    call(softcap=1, attention_mask=torch.ones(2, 7, dtype=torch.long))
    for overrides, exc, pattern in [
        (dict(k=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, r"k has dtype torch.float64"),
        (dict(v=torch.randn(2, 2, 7, 8, device="meta")), ValueError, r"v is on meta but q is on cpu"),
        (dict(prefix_v=torch.randn(2, 4, 8)), ValueError, r"prefix_k and prefix_v must have the same shape"),
        (dict(softcap=True), TypeError, r"softcap must be a float"),  # True == 1 and hash(True) == hash(1)
        (dict(softcap=-1.0), ValueError, r"softcap must be a finite float >= 0"),
        (dict(softcap=float("nan")), ValueError, r"softcap must be a finite float >= 0"),
        (dict(softcap=[1.0]), TypeError, r"softcap must be a float"),  # unhashable
        (dict(softmax_scale="big"), TypeError, r"softmax_scale must be a float"),
        (dict(softcap=1, attention_mask=torch.ones(2, 7)), TypeError, r"attention_mask must be bool or 0/1 integers"),
        (dict(attention_mask=[[1] * 7] * 2), TypeError, r"attention_mask must be a torch.Tensor"),
        (dict(q=torch.randn(2, 4, 5, 8).numpy()), TypeError, r"q must be a torch.Tensor"),
        (dict(prefix_lengths=torch.tensor([1])), ValueError, r"prefix_lengths needs prefix_ids"),
        (dict(causal=True, k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8)), ValueError, r"len_q=5 .* <= len_k=4"),
    ]:
        for _ in range(2):
            with pytest.raises(exc, match=pattern):
                call(**overrides)
    call(causal=False, k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8))  # the same shapes pass without causal
    with pytest.raises(ValueError, match=r"len_q=5 .* <= len_k=4"):
        call(causal=True, k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8))


def test_a_remembered_packed_signature_refuses_what_differs():
    q, k, v = torch.randn(6, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    pk, pv = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)

    def run(cu_k=cu_k, max_q=4, max_k=5, **kw):
        return prefix_attn.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, backend="torch", **kw)

    run()
    run()
    for kw, exc, pattern in [(dict(max_q=-1), TypeError, r"max_seqlen_q must be an int >= 0"),
                             (dict(max_k=True), TypeError, r"max_seqlen_k must be an int >= 0"),
                             (dict(cu_k=cu_k.float()), TypeError, r"cu_seqlens_k must be int32 or int64"),
                             (dict(cu_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError, r"same length"),
                             (dict(softcap=-2.0), ValueError, r"softcap must be a finite float >= 0")]:
        for _ in range(2):
            with pytest.raises(exc, match=pattern):
                run(**kw)


def test_remembered_signatures_are_bounded():
    for P in range(checks._SIGNATURE_LIMIT + 8):
        call(prefix_k=torch.randn(2, P, 8), prefix_v=torch.randn(2, P, 8))
        assert len(checks._passed) <= checks._SIGNATURE_LIMIT


def test_checks_under_torch_compile_are_traced_not_remembered():
    """Under torch.compile the checks run while tracing (no graph break) and nothing is remembered."""

    @torch.compile(backend="eager", fullgraph=True)
    def f(q, k, v, pk, pv):
        return prefix_attn.prefix_attention(q, k, v, pk, pv, backend="cpu")

    args = tuple(tensors(Tq=3, Tk=3, P=2).values())
    want = prefix_attn.prefix_attention(*args, backend="cpu")
    before = dict(checks._passed)
    torch.testing.assert_close(f(*args), want)
    assert checks._passed == before


def test_training_reaches_the_custom_ops_under_a_dispatch_mode():
    """Training calls the custom ops (below their autograd kernel in eager mode): a dispatch mode sees prefix_attn.fwd
    and prefix_attn.bwd, and the gradients are those of a call without the mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args = tensors(requires_grad=True)
    inputs = tuple(args.values())
    dout = torch.randn(2, 4, 5, 8)
    want = torch.autograd.grad(prefix_attn.prefix_attention(**args, backend="cpu"), inputs, dout)
    with Record():
        got = torch.autograd.grad(prefix_attn.prefix_attention(**args, backend="cpu"), inputs, dout)
    assert any("prefix_attn.fwd" in name for name in seen) and any("prefix_attn.bwd" in name for name in seen), seen
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_double_backward_is_refused():
    args = tensors(requires_grad=True)
    out = prefix_attn.prefix_attention(**args, backend="cpu")
    dq = torch.autograd.grad(out.square().sum(), args["q"], create_graph=True)[0]
    with pytest.raises(RuntimeError, match=r"no autograd formula"):
        dq.sum().backward()


def test_a_model_passed_int_mask_is_cast_once_and_follows_in_place_changes():
    """An attention layer given a 0/1 integer key mask (not the mask function's bool one) casts it once for all the
    layers that share it, and again after it is changed in place."""
    transformers = pytest.importorskip("transformers")
    from prefix_attn.integrations import attention as hf

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = prefix_attn.enable(transformers.LlamaForCausalLM(config), prefix_attn.PrefixTuning(config, 3))
    layers = [layer.self_attn for layer in model.model.layers]
    q, kv = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    casts = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        casts.append(self is mask)
        return to(self, *args, **kwargs)

    def run(attn, m):
        return hf.prefix_attention_forward(attn, q, kv, kv, m, scaling=0.3)[0]

    with torch.no_grad():
        want = [run(attn, mask.bool()) for attn in layers]
        torch.Tensor.to = spy
        try:
            got = [run(attn, mask) for attn in layers]
        finally:
            torch.Tensor.to = to
        assert sum(casts) == 1
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        mask[1, :2] = 1  # in place: the memoised cast is stale
        torch.testing.assert_close(run(layers[0], mask), run(layers[0], mask.bool()))
