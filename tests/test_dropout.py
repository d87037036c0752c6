"""Attention dropout: the keep mask is the same pure function of (seed, b, h, i, c) on every backend, has the
right statistics, and the op is deterministic for a fixed seed and reproducible through torch.manual_seed.

Outputs and gradients against the float64 reference with the same mask: DROPOUT_GRID in prefix_grid.py
(test_triton, test_cpu_backend, test_triton_tiles) and the varlen case below."""

import math
import os

import pytest
import torch
from prefix_grid import FLOOR

import prefix_attn
from prefix_attn import dropout as dropout_mod
from prefix_attn.ops import _cpu_status
from prefix_attn.varlen import prefix_attention_varlen_reference

BACKENDS = ["torch"]
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")
if _cpu_status()[0] is not None:
    BACKENDS.append("cpu")
KERNELS = [b for b in BACKENDS if b != "torch"]
SEED = 0x5DEECE66D * 2**20 + 11  # both 32-bit halves of the key in use


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox-4x32-10 (key = seed's low, high 32 bits)."""
    cases = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0xA4093822 | (0x299F31D0 << 32),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, seed, want in cases:
        got = dropout_mod.philox4x32(seed, *(torch.tensor([c]) for c in counter))
        assert tuple(int(x) for x in got) == want


def readout(backend, B=2, Hkv=2, group=2, Tq=9, Tk=27, P=5, N=0, p=0.3, seed=SEED):
    """The keep mask a backend's forward applies, read from its output: q = 0 gives uniform probabilities and
    V = one-hot per column (D = P + Tk), so out[b, h, i, c] != 0 exactly where column c is kept."""
    device = device_of(backend)
    D = P + Tk
    eye = torch.eye(D, device=device)
    q = torch.zeros(B, Hkv * group, Tq, D, device=device)
    k = torch.randn(B, Hkv, Tk, D, device=device)
    v = eye[P:].expand(B, Hkv, Tk, D).contiguous()
    lead = (N,) if N else ()
    pk = torch.randn(*lead, Hkv, P, D, device=device)
    pv = eye[:P].expand(*lead, Hkv, P, D).contiguous()
    bank = {"prefix_ids": torch.arange(B, device=device) % N} if N else {}
    out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=False, dropout_p=p, dropout_seed=seed, backend=backend,
                                       **bank)
    return out != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [dict(), dict(B=3, Hkv=1, group=4, Tq=1, Tk=11, P=0, p=0.5),
                                   dict(B=2, Hkv=1, group=1, Tq=16, Tk=16, P=16, p=0.1, N=3)], ids=str)
def test_every_backend_applies_dropout_mask(backend, shape):
    """Bitwise the same keep mask as prefix_attn.dropout_mask, for shared prefixes, banks, GQA, decoding."""
    kept = readout(backend, **shape)
    s = dict(B=2, Hkv=2, group=2, Tq=9, Tk=27, P=5, p=0.3) | {k: v for k, v in shape.items() if k != "N"}
    want = prefix_attn.dropout_mask(s["B"], s["Hkv"] * s["group"], s["Tq"], s["P"], s["Tk"], s["p"], SEED)
    assert torch.equal(kept.cpu(), want)


@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_sequences_are_dropout_rows(backend):
    """Packed sequence s gets row s of the mask, its own query and key numbering (read out as above)."""
    device = device_of(backend)
    lens, P, H, p = [4, 1, 7], 3, 2, 0.4
    D = P + max(lens)
    cu = torch.tensor([0, 4, 5, 12], dtype=torch.int32, device=device)
    eye = torch.eye(D, device=device)
    q = torch.zeros(12, H, D, device=device)
    k = torch.randn(12, H, D, device=device)
    v = torch.cat([eye[P:P + n] for n in lens])[:, None, :].expand(12, H, D).contiguous()
    pv = eye[:P].expand(H, P, D).contiguous()
    out = prefix_attn.prefix_attention_varlen(q, k, v, torch.randn(H, P, D, device=device), pv, cu, cu, 7, 7,
                                              causal=False, dropout_p=p, dropout_seed=SEED, backend=backend)
    for s, n in enumerate(lens):
        lo = int(cu[s])
        want = prefix_attn.dropout_mask(1, H, n, P, n, p, SEED, batch_offset=s)[0].transpose(0, 1)  # [n, H, P+n]
        assert torch.equal((out[lo:lo + n, :, :P + n] != 0).cpu(), want), f"sequence {s}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_dropout_matches_reference(backend):
    """Outputs and all five gradients against the float64 varlen reference with the same mask (2x / 3x rule)."""
    device = device_of(backend)
    g = torch.Generator().manual_seed(5)
    H, P, D = 2, 6, 32  # len_q per sequence 5, 0, 17, 3; len_k 7, 2, 17, 9
    cu_q = torch.tensor([0, 5, 5, 22, 25], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 9, 26, 35], dtype=torch.int32, device=device)
    tensors = [torch.randn(*s, generator=g).to(device) for s in ((25, 2 * H, D), (35, H, D), (35, H, D), (H, P, D),
                                                                  (H, P, D))]
    dout = torch.randn(25, 2 * H, D, generator=g).to(device)
    kw = dict(dropout_p=0.25, dropout_seed=SEED)

    def run(fn, ts, do):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*leaves)
        out.backward(do)
        return [out.detach()] + [t.grad for t in leaves]

    got = run(lambda *t: prefix_attn.prefix_attention_varlen(*t, cu_q, cu_k, 17, 17, backend=backend, **kw), tensors,
              dout)
    want = run(lambda *t: prefix_attention_varlen_reference(*t, cu_q, cu_k, **kw), [t.double() for t in tensors],
               dout.double())
    plain = run(lambda *t: prefix_attention_varlen_reference(*t, cu_q, cu_k, **kw), tensors, dout)
    for i, (a, w, pl) in enumerate(zip(got, want, plain)):
        err, plain_err = (a.double() - w).abs().max().item(), (pl.double() - w).abs().max().item()
        bound = (2.0 if i == 0 else 3.0) * plain_err + FLOOR[torch.float32] * max(1.0, w.abs().max().item())
        assert err <= bound, f"tensor {i}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(p):
    mask = prefix_attn.dropout_mask(4, 8, 64, 10, 118, p, SEED)  # 262144 draws
    n = mask.numel()
    frac = mask.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_rows_heads_and_columns_are_independent():
    """Any two slices (other row, other head, other query, the neighbouring column of the same Philox call)
    agree at the rate independent draws give, p^2 + (1 - p)^2, within 5 sigma."""
    p = 0.3
    m = prefix_attn.dropout_mask(2, 2, 128, 4, 508, p, SEED)  # [2, 2, 128, 512]
    pairs = [(m[0, 0], m[1, 0]), (m[0, 0], m[0, 1]), (m[0, 0, :-1], m[0, 0, 1:]),
             (m[0, 0, :, 0::4], m[0, 0, :, 1::4]), (m[0, 0, :, 2::4], m[0, 0, :, 3::4])]
    rate = p * p + (1 - p) ** 2
    for a, b in pairs:
        agree = (a == b).double().mean().item()
        assert abs(agree - rate) < 5 * math.sqrt(rate * (1 - rate) / a.numel()), (agree, rate)
    other = prefix_attn.dropout_mask(2, 2, 128, 4, 508, p, SEED + 1)
    agree = (m == other).double().mean().item()
    assert abs(agree - rate) < 5 * math.sqrt(rate * (1 - rate) / m.numel())


def inputs(device, B=2, Hq=4, Hkv=2, T=13, P=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device) for s in ((B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D),
                                                              (Hkv, P, D), (Hkv, P, D))]


def grads(backend, tensors, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = prefix_attn.prefix_attention(*leaves, backend=backend, **kw)
    out.backward(torch.cos(out.detach()))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_is_deterministic_and_seeds_differ(backend):
    t = inputs(device_of(backend))
    a = grads(backend, t, dropout_p=0.2, dropout_seed=7)
    b = grads(backend, t, dropout_p=0.2, dropout_seed=7)
    c = grads(backend, t, dropout_p=0.2, dropout_seed=8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_seed_round_trip(backend):
    """dropout_seed=None draws from torch's generator: consecutive calls differ, torch.manual_seed replays them."""
    t = inputs(device_of(backend))
    torch.manual_seed(1234)
    first, second = grads(backend, t, dropout_p=0.3), grads(backend, t, dropout_p=0.3)
    torch.manual_seed(1234)
    again = grads(backend, t, dropout_p=0.3)
    assert not torch.equal(first[0], second[0])
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dropout_is_the_plain_path(backend):
    """dropout_p = 0: bitwise today's result, and no random number drawn."""
    t = inputs(device_of(backend))
    state = torch.get_rng_state()
    a = grads(backend, t, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a, grads(backend, t)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", KERNELS)
def test_checkpointing_replays_the_mask(backend):
    """torch.utils.checkpoint restores the RNG state before recomputing, so the drawn seed (and mask) repeat."""
    t = inputs(device_of(backend))

    def run(checkpoint):
        leaves = [x.detach().clone().requires_grad_() for x in t]
        torch.manual_seed(99)
        fn = lambda *a: prefix_attn.prefix_attention(*a, dropout_p=0.4, backend=backend)  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(fn, *leaves, use_reentrant=False) if checkpoint else fn(*leaves)
        out.backward(torch.cos(out.detach()))
        return [out.detach()] + [x.grad for x in leaves]

    for x, y in zip(run(False), run(True)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", KERNELS)
def test_fullgraph_compile(backend):
    t = inputs(device_of(backend))
    fn = torch.compile(lambda *a: prefix_attn.prefix_attention(*a, dropout_p=0.2, dropout_seed=3, backend=backend),
                       fullgraph=True)
    leaves = [x.detach().clone().requires_grad_() for x in t]
    out = fn(*leaves)
    out.backward(torch.cos(out.detach()))
    for x, y in zip([out.detach()] + [x.grad for x in leaves], grads(backend, t, dropout_p=0.2, dropout_seed=3)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_errors():
    t = inputs("cpu")
    for p, err in ((1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError),
                   (True, TypeError)):
        with pytest.raises(err, match="dropout_p"):
            prefix_attn.prefix_attention(*t, dropout_p=p)
    for seed, err in ((-1, ValueError), (2**63, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="dropout_seed"):
            prefix_attn.prefix_attention(*t, dropout_p=0.1, dropout_seed=seed)
    with pytest.raises(ValueError, match="len_q"):
        prefix_attn.dropout_mask(1, 1, -1, 0, 1, 0.1, 0)


@pytest.mark.skipif("cpu" not in KERNELS, reason="the native CPU kernel is not built")
def test_cpu_philox_implementations_agree():
    """The AVX-512, AVX2 and scalar Philox of the C++ kernel (whichever this CPU has) give the same mask, through
    the forward (read out) and the backward (gradients bitwise equal)."""
    from prefix_attn import cpu

    mod = cpu._load()[0]
    default = mod.philox_isa()
    isas = ["scalar"]
    for isa in ("avx2", "avx512"):
        try:
            mod.set_philox_isa(isa)
            isas.append(isa)
        except RuntimeError:
            pass
    want = prefix_attn.dropout_mask(2, 4, 9, 5, 27, 0.3, SEED)
    t = inputs("cpu", T=37)
    results = []
    try:
        for isa in isas:
            mod.set_philox_isa(isa)
            assert torch.equal(readout("cpu"), want), isa
            results.append(grads("cpu", t, dropout_p=0.3, dropout_seed=SEED))
    finally:
        mod.set_philox_isa(default)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_applies_dropout_mask(backend):
    """The transposed kernels' mask (dV and the prefix dV) read out: q = 0 gives uniform probabilities and dO =
    one-hot per query, so dV[j, i] != 0 exactly where query i keeps text key j (dprefix_v[c, i]: prefix slot c)."""
    device = device_of(backend)
    H, T, P, D, p = 2, 21, 5, 32, 0.3
    q = torch.zeros(1, H, T, D, device=device)
    k, pk = torch.randn(1, H, T, D, device=device), torch.randn(H, P, D, device=device)
    v = torch.randn(1, H, T, D, device=device).requires_grad_()
    pv = torch.randn(H, P, D, device=device).requires_grad_()
    out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=False, dropout_p=p, dropout_seed=SEED, backend=backend)
    dout = torch.eye(D, device=device)[:T].expand(1, H, T, D)
    dv, dpv = torch.autograd.grad(out, (v, pv), dout)
    want = prefix_attn.dropout_mask(1, H, T, P, T, p, SEED)[0]  # [H, Tq, P + Tk]
    assert torch.equal((dv[0, :, :, :T] != 0).cpu(), want[:, :, P:].transpose(1, 2))
    assert torch.equal((dpv[:, :, :T] != 0).cpu(), want[:, :, :P].transpose(1, 2))
