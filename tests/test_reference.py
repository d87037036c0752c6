"""The reference itself: against a naive per-element formula, and gradcheck in float64."""

import math

import pytest
import torch
from prefix_grid import GRID, make_inputs

from prefix_attn.reference import prefix_attention_reference, visible_mask


def naive(q, k, v, pk, pv, causal, mask, scale):
    """Loop over every (row, head, query): softmax over the visible prefix slots and text keys."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, P = k.shape[1], k.shape[2], pk.shape[1]
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Tq):
                keys = [pk[g, n] for n in range(P)]
                vals = [pv[g, n] for n in range(P)]
                for j in range(Tk):
                    if (not causal or j <= Tk - Tq + i) and (mask is None or bool(mask[b, j])):
                        keys.append(k[b, g, j])
                        vals.append(v[b, g, j])
                if not keys:
                    continue
                s = torch.stack([float(q[b, h, i] @ kk) * scale * torch.ones((), dtype=torch.float64)
                                 for kk in keys])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(pi * vv for pi, vv in zip(p, vals))
    return out


@pytest.mark.parametrize("case", [c for c in GRID if c.len_k <= 75], ids=str)
def test_reference_matches_naive_formula(case):
    q, k, v, pk, pv, mask, _ = [None if t is None else t.double() if t.is_floating_point() else t
                                for t in make_inputs(case, torch.float64, seed=1)]
    scale = 1 / math.sqrt(case.head_dim)
    got = prefix_attention_reference(q, k, v, pk, pv, causal=case.causal, attention_mask=mask)
    torch.testing.assert_close(got, naive(q, k, v, pk, pv, case.causal, mask, scale), rtol=1e-10, atol=1e-10)


def test_visible_mask_picture():
    """The picture in the docs: Tq = Tk = 3, P = 2, causal."""
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_mask(3, 3, 2)[0, 0], want)
    # decoding: one query at the end sees everything
    assert visible_mask(1, 3, 2)[0, 0].all()


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8), (2, 3, 8), (2, 3, 8)]
    args = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    fn = lambda *a: prefix_attention_reference(*a, attention_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
