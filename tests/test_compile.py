"""The op is a torch.library custom op inside an autograd.Function: torch.compile traces it whole
(fullgraph=True fails on any graph break) and gives the eager results."""

import os

import pytest
import torch

import prefix_attn
from prefix_attn.ops import _cpu_status

BACKENDS = []
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")
if _cpu_status()[0] is not None:
    BACKENDS.append("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16), (2, 3, 16), (2, 3, 16)]
    args = [torch.randn(*s, generator=gen).to(device).requires_grad_() for s in shapes]
    mask = torch.ones(2, 11, dtype=torch.bool, device=device)
    mask[1, :4] = False

    def loss(*a):
        return (prefix_attn.prefix_attention(*a, attention_mask=mask, backend=backend) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, args)
    want = loss(*args)
    want_grads = torch.autograd.grad(want, args)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
