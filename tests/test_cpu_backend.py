"""The native CPU kernel (csrc/, prefix_attn/cpu.py) against the float64 reference.

Run directly while debugging: ``python tests/test_cpu_backend.py -x -q``.
The extension must load here: a missing build fails the suite (these tests would otherwise prove nothing
about the C++ code), unless ``PREFIX_ATTN_ALLOW_NO_CPU_EXT=1`` is set, which skips it instead.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
from prefix_grid import BANK_GRID, DROPOUT_GRID, DTYPES, GRID, SOFTCAP_GRID, Case, check_case, grid_params, make_inputs

from prefix_attn import cpu as cpu_backend
from prefix_attn import ops, prefix_attention
from prefix_attn.reference import prefix_attention_reference

ALLOW_MISSING = os.environ.get("PREFIX_ATTN_ALLOW_NO_CPU_EXT", "0") == "1"


def _module():
    ok, reason = cpu_backend.is_available()
    if not ok:
        if ALLOW_MISSING:
            pytest.skip(f"native CPU kernel unavailable ({reason}); PREFIX_ATTN_ALLOW_NO_CPU_EXT=1")
        pytest.fail(f"native CPU kernel did not load: {reason}")
    return cpu_backend._load()[0]


@pytest.fixture(scope="module")
def ext():
    return _module()


def test_extension_loaded():
    ok, reason = cpu_backend.is_available()
    if not ok and ALLOW_MISSING:
        pytest.skip(f"native CPU kernel unavailable ({reason}); PREFIX_ATTN_ALLOW_NO_CPU_EXT=1")
    assert ok, f"native CPU kernel did not load: {reason}"
    assert reason == "ok"
    assert cpu_backend.source(), "loaded module without a source description"
    assert ops.available_backends()["cpu"] == "ok"


def test_auto_dispatch_picks_cpu(ext):
    q, k, v, pk, pv, mask, _ = make_inputs(GRID[1], torch.float32)
    assert ops._pick_backend(q, None) == "cpu"
    auto = prefix_attention(q, k, v, pk, pv, attention_mask=mask)
    forced = prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="cpu")
    assert torch.equal(auto, forced)


cpu_fn = functools.partial(prefix_attention, backend="cpu")


@pytest.mark.parametrize("case,dtype", grid_params(dtypes=DTYPES + [torch.float64]))
def test_grid(ext, case, dtype):
    check_case(cpu_fn, case, dtype)


@pytest.mark.parametrize("case,dtype", grid_params(SOFTCAP_GRID, dtypes=DTYPES + [torch.float64]))
def test_softcap_grid(ext, case, dtype):
    check_case(cpu_fn, case, dtype)


@pytest.mark.parametrize("case,dtype", grid_params(BANK_GRID, dtypes=DTYPES + [torch.float64]))
def test_bank_grid(ext, case, dtype):
    check_case(cpu_fn, case, dtype)


@pytest.mark.parametrize("case,dtype", grid_params(DROPOUT_GRID, dtypes=DTYPES + [torch.float64]))
def test_dropout_grid(ext, case, dtype):
    check_case(cpu_fn, case, dtype)


@pytest.mark.parametrize("case", [GRID[4], GRID[6], GRID[10], GRID[12]], ids=str)
def test_grid_aten_gemm_fallback(ext, case):
    """The tile products through at::mm instead of BLAS (the path taken when torch exports no sgemm_)."""
    before = ext.gemm_backend()
    ext.set_gemm_backend("aten")
    try:
        check_case(cpu_fn, case, torch.float32)
    finally:
        ext.set_gemm_backend(before)


GRADCHECK_CASES = [
    Case(2, 1, 2, 3, 5, 0, 4, masked=True),      # P = 0, GQA, decoding, padding
    Case(1, 2, 1, 4, 4, 3, 3),                    # odd head_dim
    Case(2, 1, 1, 5, 5, 2, 8, causal=False, masked=True),
    Case(1, 1, 3, 1, 3, 1, 5),                    # one query, GQA 3
    Case(2, 2, 2, 7, 9, 5, 6, masked=True),
]


@pytest.mark.parametrize("softcap", [0.0, 0.8])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(ext, case, softcap):
    q, k, v, pk, pv, mask, _ = make_inputs(case, torch.float64, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]

    def fn(*xs):
        return prefix_attention(*xs, causal=case.causal, attention_mask=mask, softcap=softcap, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _fwd_bwd(case, dtype=torch.float32, seed=0, **kw):
    q, k, v, pk, pv, mask, dout = make_inputs(case, dtype, seed=seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, causal=case.causal, attention_mask=mask, backend="cpu", **kw)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def test_backward_is_deterministic(ext):
    case = Case(3, 2, 2, 75, 75, 40, 64, masked=True)
    out1, g1 = _fwd_bwd(case)
    out2, g2 = _fwd_bwd(case)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_fully_padded_query_without_prefix(ext):
    """P == 0 and a row with no visible key: zero output, zero gradients, lse = +inf."""
    B, H, T, D = 2, 2, 6, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    pk = pv = torch.zeros(H, 0, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1] = False  # row 1 sees nothing at all
    mask[0, :3] = False  # row 0: the first three queries see nothing (causal)
    out, lse = cpu_backend.prefix_attn_fwd(q, k, v, pk, pv, mask, True, D**-0.5)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    ref = prefix_attention_reference(q, k, v, pk, pv, attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn(B, H, T, D, generator=g)
    dq, dk, dv, dpk, dpv = cpu_backend.prefix_attn_bwd(dout, q, k, v, pk, pv, mask, out, lse, True, D**-0.5)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dk[1], torch.zeros_like(dk[1]))
    assert dpk.shape == (H, 0, D) and dpv.shape == (H, 0, D)


def test_unneeded_gradients_are_skipped(ext):
    case = Case(2, 2, 2, 17, 17, 7, 16, masked=True)
    q, k, v, pk, pv, mask, dout = make_inputs(case, torch.float32)
    scale = case.head_dim**-0.5
    out, lse = cpu_backend.prefix_attn_fwd(q, k, v, pk, pv, mask, True, scale)
    full = cpu_backend.prefix_attn_bwd(dout, q, k, v, pk, pv, mask, out, lse, True, scale)
    for need in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        got = cpu_backend.prefix_attn_bwd(dout, q, k, v, pk, pv, mask, out, lse, True, scale, 0.0, *need)
        wanted = [need[0], need[1], need[1], need[2], need[2]]
        for w, g, f in zip(wanted, got, full):
            if w:
                assert torch.equal(g, f)
            else:
                assert g is None
    # through autograd: only the prefix trains (the prefix-tuning case)
    leaves = [q, k, v, pk.clone().requires_grad_(), pv.clone().requires_grad_()]
    prefix_attention(*leaves, attention_mask=mask, backend="cpu").backward(dout)
    assert torch.equal(leaves[3].grad, full[3]) and torch.equal(leaves[4].grad, full[4])


def test_strided_inputs_and_shared_prefix(ext):
    """[B, T, H, D] tensors viewed as [B, H, T, D]; a prefix broadcast over heads (stride 0) is read as is."""
    B, H, T, P, D = 2, 4, 19, 5, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(3))
    pk = torch.randn(1, P, D, generator=g).expand(H, P, D)
    pv = torch.randn(H, D, P, generator=g).transpose(1, 2)  # rows not unit-stride: copied
    assert not q.is_contiguous() and pk.stride(0) == 0
    out = prefix_attention(q, k, v, pk, pv, backend="cpu")
    ref = prefix_attention(*(t.contiguous() for t in (q, k, v, pk, pv)), backend="cpu")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    want = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocks", [None, (8, 16)], ids=["default-blocks", "small-blocks"])
@pytest.mark.parametrize("case", [GRID[4], GRID[12], BANK_GRID[2], DROPOUT_GRID[0],
                                  Case(1, 1, 2, 40, 600, 520, 300, masked=True)], ids=str)
def test_16bit_is_float32_rounded(ext, case, blocks, dtype):
    """With float32 tile products, 16-bit inputs are computed in float32 from per-thread float copies of the rows
    (stage.h): the outputs and all five gradients equal, bitwise, the float32 kernel run on the upcast inputs and
    rounded to the dtype. Small blocks make every task convert and extend its cached rows many times."""
    with tile_products(ext, "float32"):
        _check_float32_rounded(ext, case, blocks, dtype)


def _check_float32_rounded(ext, case, blocks, dtype):
    from prefix_grid import dropout_seed_of, make_bank_args

    q, k, v, pk, pv, mask, dout = make_inputs(case, dtype)
    kw = dict(make_bank_args(case))
    if case.dropout:
        kw.update(dropout_p=case.dropout, dropout_seed=dropout_seed_of(0))
    fkw, bkw = dict(kw), dict(kw)
    if blocks is not None:
        fkw.update(block_q=blocks[0], block_k=blocks[1])
        bkw.update(block_q=blocks[0], block_k=blocks[1])
    scale, cap = case.head_dim**-0.5, case.softcap
    out16, lse16 = ext.fwd(q, k, v, pk, pv, mask, case.causal, scale, cap, **fkw)
    as32 = [t.float() for t in (q, k, v, pk, pv)]
    out32, lse32 = ext.fwd(*as32, mask, case.causal, scale, cap, **fkw)
    assert out16.dtype == dtype and torch.equal(out16, out32.to(dtype)) and torch.equal(lse16, lse32)
    g16 = ext.bwd(dout, q, k, v, pk, pv, mask, out16, lse16, case.causal, scale, cap, **bkw)
    g32 = ext.bwd(dout.float(), *as32, mask, out16.float(), lse16, case.causal, scale, cap, **bkw)
    for name, a, b in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], g16, g32):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype)), name


@contextlib.contextmanager
def tile_products(ext, mode):
    ext.set_tile_products(mode)
    try:
        yield
    finally:
        ext.set_tile_products("auto")


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("case,dtype", grid_params(GRID + SOFTCAP_GRID + BANK_GRID + DROPOUT_GRID,
                                                   dtypes=[torch.bfloat16, torch.float16]))
def test_16bit_products_grid(ext, case, dtype):
    """16-bit tile products (Q, K, V, dO in place; P and dS rounded to the dtype; float32 accumulation), forced on
    whatever the CPU: the float64 grid under the 16-bit rule, as the float32-products path."""
    with tile_products(ext, "16-bit"):
        assert ext.tile_products(str(dtype).split(".")[1]) == str(dtype).split(".")[1]
        check_case(cpu_fn, case, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_products_are_deterministic_and_taken(ext, dtype):
    """Bitwise the same run to run, and not the float32-products results (the 16-bit products did run)."""
    case = Case(2, 4, 2, 150, 150, 70, 64, masked=True)
    with tile_products(ext, "16-bit"):
        out1, g1 = _fwd_bwd(case, dtype)
        out2, g2 = _fwd_bwd(case, dtype)
    with tile_products(ext, "float32"):
        out3, g3 = _fwd_bwd(case, dtype)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(out1, out3)
    assert all(not torch.equal(a, b) for a, b in zip(g1, g3))


def test_16bit_products_default_follows_the_cpu(ext):
    """'auto': bfloat16 products on a CPU with AMX-BF16, float16 products with AMX-FP16, float32 otherwise."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    want_bf16 = {"amx_tile", "amx_bf16"} <= flags
    want_f16 = {"amx_tile", "amx_fp16"} <= flags
    assert ext.tile_products("bfloat16") == ("bfloat16" if want_bf16 else "float32")
    assert ext.tile_products("float16") == ("float16" if want_f16 else "float32")
    with pytest.raises(RuntimeError, match="'auto', 'float32' or '16-bit'"):
        ext.set_tile_products("amx")


def test_16bit_strided_inputs(ext):
    """bfloat16 [B, T, H, D] views and a head-broadcast prefix: the same results as contiguous copies."""
    B, H, T, P, D = 2, 4, 19, 5, 16
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2).requires_grad_() for _ in range(3))
    pk = torch.randn(1, P, D, generator=g).bfloat16().expand(H, P, D).requires_grad_()
    pv = torch.randn(H, P, D, generator=g).bfloat16().requires_grad_()
    dout = torch.randn(B, H, T, D, generator=g).bfloat16()
    leaves = [q, k, v, pk, pv]
    prefix_attention(*leaves, backend="cpu").backward(dout)
    copies = [t.detach().contiguous().requires_grad_() for t in leaves]
    out = prefix_attention(*copies, backend="cpu")
    out.backward(dout)
    torch.testing.assert_close(prefix_attention(*leaves, backend="cpu"), out, rtol=0, atol=0)
    for a, b in zip(leaves, copies):
        torch.testing.assert_close(a.grad, b.grad.expand_as(a.grad) if a is pk else b.grad, rtol=0, atol=0)


def test_lse_matches_reference(ext):
    case = GRID[6]
    q, k, v, pk, pv, mask, _ = make_inputs(case, torch.float32)
    out, lse = cpu_backend.prefix_attn_fwd(q, k, v, pk, pv, mask, case.causal, 0.3)
    as64 = [t.double() for t in (q, k, v, pk, pv)]
    ref_out, ref_lse = prefix_attention_reference(*as64, causal=case.causal, softmax_scale=0.3,
                                                  attention_mask=mask, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


def test_boundary_checks_name_the_argument(ext):
    q = torch.randn(1, 2, 3, 4)
    k = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match=r"prefix_k must be \[heads_kv=2, num_prefix, head_dim=4\]"):
        ext.fwd(q, k, k, torch.randn(3, 1, 4), torch.randn(3, 1, 4), None, True, 0.5)
    with pytest.raises(RuntimeError, match=r"attention_mask must be \[batch=1, len_k=3\]"):
        bad_mask = torch.ones(1, 4, dtype=torch.bool)
        ext.fwd(q, k, k, torch.randn(2, 1, 4), torch.randn(2, 1, 4), bad_mask, True, 0.5)


def test_packed_offsets_are_checked_where_they_guard_memory(ext):
    """The kernel's own checks of cu_seqlens (the Python front door checks them first, with the same rules)."""
    q, k = torch.randn(5, 2, 4), torch.randn(7, 2, 4)
    pk = torch.randn(2, 1, 4)

    def fwd(cu_q, cu_k, **kw):
        return ext.fwd(q, k, k, pk, pk, kw.get("mask"), True, 0.5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    ok = fwd(torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7]))[0]
    assert ok.shape == (5, 2, 4)
    for cu_q, cu_k, message in [
        (torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([0, 3, 7]), "not at the packed totals"),
        (torch.tensor([0, 2, 5]), torch.tensor([0, 3, 9]), "not at the packed totals"),
        (torch.tensor([1, 2, 5]), torch.tensor([0, 3, 7]), "must start at 0"),
        (torch.tensor([0, 3, 5]), torch.tensor([0, 2, 7]), "len_q=3 > len_k=2"),
        (torch.tensor([0, 6, 5]), torch.tensor([0, 7, 7]), "non-decreasing"),
        (torch.tensor([0.0, 2.0, 5.0]), torch.tensor([0, 3, 7]), "int32 or int64"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            fwd(cu_q, cu_k)
    with pytest.raises(RuntimeError, match="attention_mask must be None with cu_seqlens"):
        fwd(torch.tensor([0, 5]), torch.tensor([0, 7]), mask=torch.ones(1, 7, dtype=torch.bool))


def test_large_head_dim_and_multiple_key_blocks(ext):
    """head_dim above the Triton limit, and more keys than one block (online softmax across blocks)."""
    case = Case(1, 1, 2, 40, 600, 520, 300, masked=True)
    check_case(cpu_fn, case, torch.float32)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
