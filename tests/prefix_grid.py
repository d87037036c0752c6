"""The correctness grid shared by every backend's tests, and the comparison rule.

Each case is computed three ways: the backend under test, the float64 reference, and the reference run in
the same low precision as the inputs ("plain PyTorch"). The backend's error against float64 must stay
within 2x (outputs) / 3x (gradients) of plain PyTorch's own error, plus a small per-dtype floor relative
to the magnitude of the result (flash-attention's criterion).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import pytest
import torch

from prefix_attn.reference import prefix_attention_reference


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads_kv: int
    group: int  # heads_q // heads_kv
    len_q: int
    len_k: int
    num_prefix: int
    head_dim: int
    causal: bool = True
    masked: bool = False  # left padding through attention_mask
    softcap: float = 0.0  # > 0: scores capped as softcap * tanh(s / softcap)
    entries: int = 0  # > 0: a bank of this many prefixes, one chosen per row (prefix_ids)
    ids: str = "random"  # with a bank: "random" (some entries unused), "same" (every row on one), "distinct"
    lengths: bool = False  # with a bank: random per-entry lengths in [0, P] (prefix_lengths)
    dropout: float = 0.0  # > 0: attention dropout with a fixed seed (the reference applies the same mask)

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group

    def __str__(self) -> str:
        return (f"B{self.batch}-Hq{self.heads_q}-Hkv{self.heads_kv}-Tq{self.len_q}-Tk{self.len_k}"
                f"-P{self.num_prefix}-D{self.head_dim}-{'causal' if self.causal else 'full'}"
                f"{'-mask' if self.masked else ''}{f'-cap{self.softcap:g}' if self.softcap else ''}"
                f"{f'-bank{self.entries}-{self.ids}' if self.entries else ''}{'-len' if self.lengths else ''}"
                f"{f'-drop{self.dropout:g}' if self.dropout else ''}")


# Odd lengths on purpose: 1, 17, 75, 113; P = 0, 1, odd, larger than a block; every GQA ratio in {1, 2, 4};
# len_q < len_k (decoding), len_q == len_k, and len_q > len_k without causal; causal on and off; with and without
# left padding.
GRID = [
    Case(2, 2, 1, 17, 17, 0, 16),
    Case(2, 2, 1, 17, 17, 1, 32, masked=True),
    Case(1, 1, 4, 1, 1, 3, 16),
    Case(3, 1, 2, 1, 1, 0, 16, masked=True),
    Case(2, 2, 2, 75, 75, 7, 64, masked=True),
    Case(1, 2, 4, 75, 75, 40, 40),
    Case(2, 1, 1, 5, 75, 40, 64, masked=True),
    Case(1, 2, 2, 1, 17, 7, 32),
    Case(2, 2, 1, 17, 17, 40, 16, causal=False, masked=True),
    Case(1, 1, 2, 13, 75, 1, 64, causal=False),
    Case(2, 1, 4, 17, 17, 0, 40, causal=False, masked=True),
    Case(1, 2, 1, 33, 70, 0, 128, masked=True),
    Case(2, 1, 1, 113, 113, 17, 16, masked=True),
    Case(1, 1, 4, 113, 113, 3, 24),
    # cross-attention (an encoder-decoder's): non-causal, more queries than keys
    Case(2, 2, 1, 75, 17, 5, 32, causal=False, masked=True),
    Case(1, 1, 2, 113, 1, 0, 16, causal=False),
]

# Softcapping (Gemma 2 style): caps of 1 and 2.5 on N(0, 1) scores saturate tanh on part of every row.
SOFTCAP_GRID = [
    Case(2, 2, 2, 75, 75, 7, 64, masked=True, softcap=1.0),
    Case(1, 2, 1, 5, 75, 40, 32, softcap=2.5),
    Case(2, 1, 4, 17, 17, 0, 16, causal=False, masked=True, softcap=1.0),
]

# A bank of prefixes, one per row: unused entries, every row on one entry, distinct entries, per-entry lengths
# (0 and P included), P = 0 and 1, GQA, padding, softcap, decoding.
BANK_GRID = [
    Case(3, 2, 1, 17, 17, 5, 16, entries=4),
    Case(4, 1, 2, 1, 1, 3, 16, entries=2, ids="same"),
    Case(2, 2, 2, 75, 75, 7, 64, masked=True, entries=3, lengths=True),
    Case(3, 1, 4, 17, 40, 17, 24, causal=False, entries=3, ids="distinct", lengths=True),
    Case(2, 1, 1, 5, 75, 40, 32, entries=5, lengths=True, softcap=2.5),
    Case(2, 1, 2, 17, 17, 0, 16, entries=2),
    Case(3, 2, 1, 13, 20, 1, 16, masked=True, entries=3, lengths=True),
]

# Attention dropout (p = 0.1 .. 0.5, a fixed 64-bit seed): prefix and text columns, padding, decoding, GQA,
# P = 0, non-causal, a bank with lengths, softcap.
DROPOUT_GRID = [
    Case(2, 2, 2, 75, 75, 7, 64, masked=True, dropout=0.1),
    Case(1, 1, 4, 113, 113, 3, 24, dropout=0.3),
    Case(2, 1, 1, 5, 75, 40, 64, masked=True, dropout=0.5),
    Case(2, 1, 4, 17, 17, 0, 40, causal=False, masked=True, dropout=0.2),
    Case(1, 2, 1, 1, 17, 7, 32, dropout=0.1),
    Case(3, 2, 1, 17, 17, 5, 16, entries=4, lengths=True, dropout=0.25),
    Case(1, 2, 1, 5, 75, 40, 32, softcap=2.5, dropout=0.15),
    Case(2, 1, 2, 40, 17, 3, 16, causal=False, masked=True, dropout=0.2),
]

# Real sizes, run compiled on a GPU only (tests/test_triton.py, `pytest -m gpu`): GPT-2 and Llama-like heads, P up to
# 200, decoding, GQA, ragged lengths, softcap, dropout and a bank.
GPU_GRID = [
    Case(4, 12, 1, 1024, 1024, 16, 64),
    Case(4, 12, 1, 1024, 1024, 200, 64, masked=True),
    Case(2, 8, 4, 1024, 1024, 77, 128),
    Case(2, 4, 2, 129, 1024, 31, 128, masked=True),
    Case(2, 4, 2, 1, 1000, 200, 128),
    Case(1, 2, 3, 1023, 1023, 113, 96, causal=False),
    Case(1, 2, 3, 1023, 1023, 113, 128, causal=False),  # with the two below: which of D = 96, full, group 3
    Case(1, 2, 3, 1000, 1000, 50, 96),
    Case(2, 4, 2, 1000, 1000, 50, 64, causal=False),
    Case(4, 12, 1, 512, 512, 64, 64, causal=False, masked=True),  # encoder training (P-Tuning v2 on BERT)
    Case(2, 8, 2, 300, 1024, 32, 128, causal=False),  # cross-attention: fewer queries than keys, full
    Case(2, 4, 2, 777, 777, 64, 128, masked=True, softcap=2.0),
    Case(2, 12, 1, 1, 1024, 200, 64, softcap=1.0),
    Case(4, 12, 1, 1024, 1024, 200, 64, masked=True, dropout=0.1),
    Case(2, 8, 4, 777, 1024, 77, 128, dropout=0.3, entries=3, lengths=True),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Floors, relative to max(1, |reference|): what rounding of the inputs alone can cost.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def grid_params(grid=GRID, dtypes=DTYPES):
    return [pytest.param(case, dtype, id=f"{case}-{dtype_id(dtype)}") for case in grid for dtype in dtypes]


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Fresh random q, k, v, prefix_k, prefix_v, attention_mask (left padding or None), dout."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = rnd(case.batch, case.heads_q, case.len_q, case.head_dim)
    k = rnd(case.batch, case.heads_kv, case.len_k, case.head_dim)
    v = rnd(case.batch, case.heads_kv, case.len_k, case.head_dim)
    lead = (case.entries,) if case.entries else ()
    pk = rnd(*lead, case.heads_kv, case.num_prefix, case.head_dim)
    pv = rnd(*lead, case.heads_kv, case.num_prefix, case.head_dim)
    dout = rnd(case.batch, case.heads_q, case.len_q, case.head_dim)
    mask = None
    if case.masked:
        # row 0 unpadded, the others left-padded by a random amount (possibly everything but one key)
        pad = torch.randint(0, case.len_k, (case.batch,), generator=gen)
        pad[0] = 0
        mask = (torch.arange(case.len_k)[None, :] >= pad[:, None]).to(device)
    return q, k, v, pk, pv, mask, dout


def dropout_seed_of(seed: int) -> int:
    """The grid's dropout seed for a case seed: both 32-bit halves of the Philox key in use."""
    return (seed + 1) * 2**40 + 977 * seed + 12345


def make_bank_args(case: Case, device="cpu", seed: int = 0) -> dict:
    """prefix_ids [B] (and prefix_lengths [N]) for a bank case; {} for a shared prefix."""
    if not case.entries:
        return {}
    gen = torch.Generator().manual_seed(seed + 7)
    if case.ids == "same":
        ids = torch.full((case.batch,), case.entries - 1, dtype=torch.long)
    elif case.ids == "distinct":
        ids = torch.randperm(case.entries, generator=gen)[: case.batch]
    else:
        ids = torch.randint(0, case.entries, (case.batch,), generator=gen)
    out = {"prefix_ids": ids.to(device)}
    if case.lengths:
        lengths = torch.randint(0, case.num_prefix + 1, (case.entries,), generator=gen)
        lengths[ids[0]] = case.num_prefix  # the full length and an empty entry, both in use
        if case.batch > 1 and ids[1] != ids[0]:
            lengths[ids[1]] = 0
        out["prefix_lengths"] = lengths.to(device=device, dtype=torch.int32)
    return out


def run_with_grads(fn: Callable, q, k, v, pk, pv, mask, dout, causal: bool, requires=(True,) * 5):
    """Call fn on leaf copies, backprop dout; returns (out, grads tuple with None where not required)."""
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((q, k, v, pk, pv), requires)]
    out = fn(*leaves, causal=causal, attention_mask=mask)
    if any(requires):
        out.backward(dout.to(out.dtype))
    return out.detach(), tuple(None if t.grad is None else t.grad.detach() for t in leaves)


def reference_fn(compute_dtype: Optional[torch.dtype], softcap: float = 0.0, **bank):
    def fn(q, k, v, pk, pv, *, causal, attention_mask):
        return prefix_attention_reference(q, k, v, pk, pv, causal=causal, attention_mask=attention_mask,
                                          softcap=softcap, compute_dtype=compute_dtype, **bank)
    return fn


def case_args(case: Case, device="cpu", seed: int = 0) -> dict:
    """The op's keyword arguments of a case besides the tensors: bank, dropout (same for op and references)."""
    bank = make_bank_args(case, device, seed)
    if case.dropout:  # passed to the op and to the references alike: the same keep mask everywhere
        bank = dict(bank, dropout_p=case.dropout, dropout_seed=dropout_seed_of(seed))
    return bank


def run_case(fn: Callable, case: Case, dtype: torch.dtype, device="cpu", seed: int = 0):
    """fn's (out, grads) on the case's inputs: the calls a test of the case makes of the op under test."""
    q, k, v, pk, pv, mask, dout = make_inputs(case, dtype, device, seed)
    extra = dict(case_args(case, device, seed), **({"softcap": case.softcap} if case.softcap else {}))
    return run_with_grads(functools.partial(fn, **extra), q, k, v, pk, pv, mask, dout, case.causal)


def case_errors(fn: Callable, case: Case, dtype: torch.dtype, device="cpu", seed: int = 0) -> list:
    """[(name, problem or None, error, bound)] for the output and the five gradients, in that order: fn against the
    float64 reference under the 2x/3x rule; problem says what is wrong (missing, shape, dtype, non-finite, error)."""
    q, k, v, pk, pv, mask, dout = make_inputs(case, dtype, device, seed)
    bank = case_args(case, device, seed)
    out, grads = run_case(fn, case, dtype, device, seed)
    as64 = [t.double() for t in (q, k, v, pk, pv, dout)]
    ref, ref_grads = run_with_grads(reference_fn(torch.float64, case.softcap, **bank), *as64[:5], mask, as64[5],
                                    case.causal)
    low, low_grads = run_with_grads(reference_fn(dtype, case.softcap, **bank), q, k, v, pk, pv, mask, dout,
                                    case.causal)
    rows = []
    for i, (name, got, want, plain) in enumerate(zip(NAMES, (out,) + grads, (ref,) + ref_grads,
                                                     (low,) + low_grads)):
        err = bound = float("nan")
        if got is None:
            problem = "missing"
        elif got.shape != want.shape:
            problem = f"shape {tuple(got.shape)} != {tuple(want.shape)}"
        elif got.dtype != dtype:
            problem = f"dtype {got.dtype} != {dtype}"
        elif not torch.isfinite(got).all():
            problem = "non-finite values"
        else:
            err = (got.double() - want).abs().max().item() if want.numel() else 0.0
            plain_err = (plain.double() - want).abs().max().item() if want.numel() else 0.0
            scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
            bound = (2.0 if i == 0 else 3.0) * plain_err + FLOOR[dtype] * scale
            problem = None if err <= bound else (f"max error {err:.3e} > bound {bound:.3e} "
                                                 f"(plain PyTorch error {plain_err:.3e})")
        rows.append((name, problem, err, bound))
    return rows


def check_case(fn: Callable, case: Case, dtype: torch.dtype, device="cpu", seed: int = 0) -> None:
    """Assert fn's output and all five gradients match the float64 reference under the 2x/3x rule."""
    for name, problem, _, _ in case_errors(fn, case, dtype, device, seed):
        assert problem is None, f"{case} {dtype_id(dtype)} {name}: {problem}"
