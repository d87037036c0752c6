"""Packed (varlen) prefix attention: many sequences concatenated along one token axis, each seeing the prefix and
its own causal text, nothing else (flash-attention's ``flash_attn_varlen_func`` layout).

    out = prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, causal=True)

Shapes::

    q:                  [total_q, heads_q, head_dim]        sequence s: rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]
    k, v:               [total_k, heads_kv, head_dim]       sequence s: rows cu_seqlens_k[s] .. cu_seqlens_k[s+1]
    prefix_k/v:         [heads_kv, P, head_dim], or a bank [N, heads_kv, P, head_dim] with prefix_ids [S]
    cu_seqlens_q/k:     int32/int64 [S + 1], 0 first, non-decreasing, last = total; len_q(s) <= len_k(s)
    out:                [total_q, heads_q, head_dim]
    lse (internal):     [heads_q, total_q] float32

One op with the padded path (``ops.PrefixAttentionFunction`` with cu_seqlens): ``triton`` runs the padded
kernels with a compile-time VARLEN switch and ``cpu`` the native kernel with a per-sequence descriptor (sequence s
is "batch row" s, its offsets read from cu_seqlens; no padding in memory, no per-sequence loop); ``torch`` is the
reference, the padded reference per sequence. The prefix gradients are summed over all sequences,
deterministically. The offsets' values are read on the host once per cu_seqlens tensor (``checks.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks, ops
from .reference import prefix_attention_varlen_reference  # noqa: F401  (re-exported: the oracle of the tests)

__all__ = ["prefix_attention_varlen", "prefix_attention_varlen_reference"]


def prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                            max_seqlen_k: int, *, causal: bool = True, softmax_scale: Optional[float] = None,
                            softcap: float = 0.0, prefix_ids: Optional[torch.Tensor] = None,
                            prefix_lengths: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                            dropout_seed: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Prefix attention over packed sequences (shapes in the module docstring); -> ``[total_q, heads_q, head_dim]``.

    Sequence ``s`` sees every prefix slot (of entry ``prefix_ids[s]`` with a bank) and, when ``causal``, its own
    text keys up to its bottom-right diagonal; sequences of length 0 are allowed. Gradients flow to all five
    tensors, the prefix gradients summed over the sequences. ``dropout_p`` / ``dropout_seed`` as in
    ``prefix_attention``, sequence ``s`` taking the place of batch row ``s`` in the dropout mask.
    """
    (q, k, v, prefix_k, prefix_v), scope = ops.autocast_inputs(q, k, v, prefix_k, prefix_v)
    checks.check_packed(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, softcap, prefix_ids, prefix_lengths)
    with scope:
        return ops.apply(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lengths=prefix_lengths,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                         max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale, softcap=softcap,
                         dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend)
