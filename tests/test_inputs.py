"""Bad input gets a clear error naming the argument and the expected shape."""

import pytest
import torch

import prefix_attn


def good(B=2, Hq=4, Hkv=2, Tq=5, Tk=7, P=3, D=8, dtype=torch.float32):
    return dict(
        q=torch.randn(B, Hq, Tq, D, dtype=dtype), k=torch.randn(B, Hkv, Tk, D, dtype=dtype),
        v=torch.randn(B, Hkv, Tk, D, dtype=dtype), prefix_k=torch.randn(Hkv, P, D, dtype=dtype),
        prefix_v=torch.randn(Hkv, P, D, dtype=dtype),
    )


def call(**overrides):
    args = good()
    kwargs = {name: overrides.pop(name) for name in list(overrides) if name not in args}
    args.update(overrides)
    kwargs.setdefault("backend", "torch")
    return prefix_attn.prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"],
                                        **kwargs)


@pytest.mark.parametrize("overrides,exc,pattern", [
    (dict(q=torch.randn(2, 4, 8)), ValueError, r"q must be \[batch, heads_q, len_q, head_dim\] \(rank 4\)"),
    (dict(k=torch.randn(2, 2, 7)), ValueError, r"k must be \[batch, heads_kv, len_k, head_dim\]"),
    (dict(prefix_k=torch.randn(1, 2, 3, 8)), ValueError, r"prefix_k has rank 4 \(a bank .* pass prefix_ids"),
    (dict(prefix_k=torch.randn(2, 3)), ValueError, r"prefix_k must be \[heads_kv, num_prefix, head_dim\]"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, r"k and v must have the same shape"),
    (dict(prefix_v=torch.randn(2, 4, 8)), ValueError, r"prefix_k and prefix_v must have the same shape"),
    (dict(k=torch.randn(3, 2, 7, 8), v=torch.randn(3, 2, 7, 8)), ValueError, r"k must be \[batch=2"),
    (dict(k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16)), ValueError, r"head_dim=8"),
    (dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), ValueError, r"heads_q=4 .* multiple of heads_kv=3"),
    (dict(k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8)), ValueError, r"len_q=5 .* <= len_k=4"),
    (dict(prefix_k=torch.randn(1, 3, 8), prefix_v=torch.randn(1, 3, 8)), ValueError,
     r"prefix_k must be \[heads_kv=2, num_prefix, head_dim=8\]"),
    (dict(prefix_k=torch.randn(2, 3, 4), prefix_v=torch.randn(2, 3, 4)), ValueError, r"head_dim=8"),
    (dict(k=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, r"k has dtype torch.float64 but q has"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 8))), TypeError, r"q must be float16, bfloat16, float32 or float64"),
    (dict(q="not a tensor"), TypeError, r"q must be a torch.Tensor"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"attention_mask must be \[batch=2, len_k=7\]"),
    (dict(attention_mask=torch.zeros(2, 7)), TypeError, r"attention_mask must be bool or 0/1 integers"),
    (dict(softmax_scale="big"), TypeError, r"softmax_scale must be a float"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a finite float >= 0"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be a finite float >= 0"),
    (dict(softcap=True), TypeError, r"softcap must be a float"),
    (dict(softcap=torch.tensor(2.0)), TypeError, r"softcap must be a float"),
    (dict(backend="cuda"), ValueError, r"backend must be None or one of"),
])
def test_bad_input(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**overrides)


def test_device_mismatch_is_named():
    args = good()
    args["k"] = args["k"].to("meta")
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu"):
        prefix_attn.prefix_attention(**args, backend="torch")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from prefix_attn import backends

    # the Triton launchers load first, under the session's own setting: kernels decorated while the variable reads 0
    # would stay compiled-only for every later test of this process
    backends.triton_status()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, RuntimeError), match=r"backend='triton'"):
        call(backend="triton")


def test_cpu_backend_on_other_device_is_refused():
    args = {k: v.to("meta") for k, v in good().items()}
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors"):
        prefix_attn.prefix_attention(**args, backend="cpu")


def test_int_mask_and_zero_prefix_accepted():
    args = good(P=0)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    out = prefix_attn.prefix_attention(**args, attention_mask=mask, backend="torch")
    assert out.shape == (2, 4, 5, 8) and torch.isfinite(out).all()


def test_import_is_cheap():
    """Importing the package must not load the Triton kernels, the C++ extension, or initialise CUDA."""
    import subprocess
    import sys

    code = ("import sys, torch, prefix_attn; "
            "print([m for m in sys.modules if m.startswith(('prefix_attn.triton', 'prefix_attn._C', "
            "'prefix_attn_cpu'))], torch.cuda.is_initialized())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["[]", "False"]
