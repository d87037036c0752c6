"""The decode path: a few queries per row (``len_q <= DECODE_MAX_LEN_Q``) and no gradient, as in ``generate()``.

The prefix is shared by the rows (or, with a bank, by the rows that chose one entry), so its part of the
attention is one product per kv head for all of them: the queries of every row and of every query head of a GQA
group folded into the M dimension, ``[heads_kv, rows * group * len_q, D] @ [heads_kv, D, P]`` (Hydragen,
FlashInfer's cascade). The prefix is read once, not once per row. Both parts run through the backend's own kernel
with an empty prefix: the prefix part as one sequence of ``rows * group * len_q`` queries per kv head against the
prefix as its keys (no causal mask: every query sees every prefix slot; a bank: one such sequence per entry in
use, all of them one call, each entry's slots past its length masked as padding), the text part per row, a GQA
group's query heads folded into one sequence when the causal mask allows (``len_q == 1``), so a kv head is read
once. The two parts are merged by their log-sum-exp.

On the Triton backend the decode path is split-KV decoding instead (``split_forward``,
``prefix_attn/triton/decode_launch.py``): the same fold, the prefix and the text cut into splits of their keys that
are the work items of one launch of the forward kernel, then one launch that merges every query's splits by
log-sum-exp. It takes any prefix length (0 too) and any batch: the splits fill the GPU where a fused call would run
one program per row and head.

Shapes as in ``prefix_attention``. The merged ``lse`` keeps the kernels' convention: ``+inf`` for a query that
sees no key at all.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks

DECODE_MAX_LEN_Q = 16
# The prefix part pays for its merge once the prefix is shared widely enough: at least this many rows, and this
# many query sequences (rows x GQA group; a bank: per entry in use) reading each of its kv heads. Below, the fused
# kernel is as fast or faster (`python benchmarks/bench_decode_cpu.py --threshold`, AMD EPYC, 2 threads, len_q = 1:
# MHA B = 8 0.99x, B = 16 1.78x; GQA 4 B = 2 0.95x, B = 4 1.17x).
DECODE_MIN_ROWS = 2
DECODE_MIN_READERS = 16


def applies(q, prefix_k, prefix_v, packed: bool, dropout_p: float, needs_grad: bool, backend: str = "cpu") -> bool:
    """Whether a forward takes the decode path (``generate()`` does, with no option). On the Triton backend every
    padded call with few queries and no gradient or dropout does (split-KV decoding, ``split_forward``)."""
    if packed or needs_grad or dropout_p > 0 or q.shape[2] > DECODE_MAX_LEN_Q:
        return False
    if backend == "triton":
        return True
    if prefix_k.shape[-2] == 0:
        return False
    readers = q.shape[0] * (q.shape[1] // prefix_k.shape[-3])
    if prefix_k.dim() == 4:  # a bank: readers per entry
        readers = readers // max(prefix_k.shape[0], 1)
    return q.shape[0] >= DECODE_MIN_ROWS and readers >= DECODE_MIN_READERS


def _fold(q, heads_kv: int):
    """``[R, Hq, Lq, D]`` -> ``[1, Hkv, R * group * Lq, D]``: every row's queries of a kv head in one sequence."""
    rows, heads_q, len_q, head_dim = q.shape
    return q.reshape(rows, heads_kv, -1, head_dim).transpose(0, 1).reshape(1, heads_kv, -1, head_dim)


def _unfold(x, shape):
    """The inverse of ``_fold`` for the output ``[1, Hkv, M, D]`` (or lse ``[1, Hkv, M]``)."""
    rows, heads_q, len_q = shape[:3]
    heads_kv = x.shape[1]
    tail = x.shape[3:]
    return x[0].reshape(heads_kv, rows, -1, *tail).transpose(0, 1).reshape(rows, heads_q, len_q, *tail)


def _prefix_part(attend, q, pk, pv):
    """The queries ``[R, Hq, Lq, D]`` against one prefix ``[Hkv, P, D]``, as one sequence per kv head."""
    out, lse = attend(_fold(q, pk.shape[0]), pk[None], pv[None], False, None)
    return _unfold(out, q.shape), _unfold(lse, q.shape)


def _text_part(attend, q, k, v, mask, causal: bool):
    """Each row's queries against its own keys. One query per head (the usual decode step) or no causal mask: the
    query heads of a GQA group are one sequence of ``group * len_q`` queries of their kv head, which is read once."""
    heads_kv = k.shape[1]
    rows, heads_q, len_q, head_dim = q.shape
    if heads_q == heads_kv or (causal and len_q > 1):
        return attend(q, k, v, causal, mask)
    out, lse = attend(q.reshape(rows, heads_kv, -1, head_dim), k, v, False, mask)
    return out.reshape(q.shape), lse.reshape(q.shape[:3])


class _BankPlan:
    """The rows of a bank grouped by entry, for one call over every entry in use (built once per ``prefix_ids``
    tensor, from one host read): ``entries`` [E] the entries some row chose, ``gather`` [E * M] each entry's rows
    padded to the largest group M (with its first row; the padded queries' results are dropped), ``where`` [B]
    each row's place in ``gather``."""

    def __init__(self, values, device):
        rows = {}
        for b, e in enumerate(values):
            rows.setdefault(e, []).append(b)
        entries = sorted(rows)
        self.size = max(len(r) for r in rows.values())
        gather, where = [], [0] * len(values)
        for i, e in enumerate(entries):
            for j, b in enumerate(rows[e]):
                where[b] = i * self.size + j
            gather += rows[e] + [rows[e][0]] * (self.size - len(rows[e]))
        self.entries = torch.tensor(entries, dtype=torch.long, device=device)
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.where = torch.tensor(where, dtype=torch.long, device=device)


def _bank_part(attend, q, bank_k, bank_v, prefix_lengths, plan: _BankPlan):
    """The queries ``[R, Hq, Lq, D]`` against each row's bank entry ``[N, Hkv, P, D]``: one call, entry ``i`` in use
    a sequence of keys (its slots past ``prefix_lengths`` masked) for the queries of its rows, padded to the same
    count, folded per kv head as in ``_prefix_part``."""
    rows, heads_q, len_q, head_dim = q.shape
    n_used, heads_kv, slots = plan.entries.numel(), bank_k.shape[1], bank_k.shape[2]
    qg = q.index_select(0, plan.gather).reshape(n_used, plan.size, heads_kv, -1, len_q, head_dim)
    qg = qg.transpose(1, 2).reshape(n_used, heads_kv, -1, head_dim)
    # every entry in use (the entries are sorted and distinct): the bank itself, else the entries in use copied
    keys, values = (bank_k, bank_v) if n_used == bank_k.shape[0] else (bank_k.index_select(0, plan.entries),
                                                                       bank_v.index_select(0, plan.entries))
    mask = None
    if prefix_lengths is not None:  # compared on the device: no host read
        lengths = prefix_lengths.to(plan.entries.device).long().index_select(0, plan.entries)
        mask = torch.arange(slots, device=q.device)[None, :] < lengths[:, None]
    out, lse = attend(qg, keys, values, False, mask)

    def unfold(x):  # [E, Hkv, M * group * Lq, ...] -> [R, Hq, Lq, ...]
        tail = x.shape[3:]
        x = x.reshape(n_used, heads_kv, plan.size, -1, len_q, *tail).transpose(1, 2)
        return x.reshape(n_used * plan.size, heads_q, len_q, *tail).index_select(0, plan.where)

    return unfold(out), unfold(lse)


def forward(attend, q, k, v, prefix_k, prefix_v, mask, prefix_ids: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (out like q, lse [B, Hq, Lq]). ``attend(q, k, v, causal, mask) -> (out, lse)``: the backend's kernel
    with an empty prefix (the softmax scale and softcap of the call bound in)."""
    out_t, lse_t = _text_part(attend, q, k, v, mask, causal)
    if prefix_ids is None:
        out_p, lse_p = _prefix_part(attend, q, prefix_k, prefix_v)
    else:
        plan = checks.memo(prefix_ids, "decode_bank_plan",
                           lambda: _BankPlan(checks.host_list(prefix_ids), q.device))
        out_p, lse_p = _bank_part(attend, q, prefix_k, prefix_v, prefix_lengths, plan)
    # the kernels' lse is +inf for a query that sees no key: -inf here, so that its weight is 0
    lse_p, lse_t = (x.masked_fill(x == float("inf"), float("-inf")) for x in (lse_p, lse_t))
    lse = torch.logaddexp(lse_p, lse_t)
    seen = lse != float("-inf")  # NaN too: a diverged part makes the output NaN, as in plain attention
    w_p = torch.where(seen, torch.exp(lse_p - lse), 0.0)[..., None]
    w_t = torch.where(seen, torch.exp(lse_t - lse), 0.0)[..., None]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = (out_p.to(acc) * w_p).add_(out_t.to(acc) * w_t)
    return out.to(q.dtype), lse.masked_fill(~seen, float("inf"))


# ------------------------------------------------------------------------------------------- Triton: split-KV
def _split_launch(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, causal, softmax_scale,
                  softcap):
    from .triton import decode_launch  # noqa: PLC0415 - lazy: importing triton is slow

    return decode_launch.decode_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap,
                                    prefix_ids=prefix_ids, prefix_lengths=prefix_lengths)


# the launcher as a custom op (torch.compile, dispatch modes), as ops.py does for the fused forward
@torch.library.custom_op("prefix_attn::decode_split", mutates_args=())
def _split_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
              attention_mask: Optional[torch.Tensor], prefix_ids: Optional[torch.Tensor],
              prefix_lengths: Optional[torch.Tensor], causal: bool, softmax_scale: float,
              softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _split_launch(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, causal,
                         softmax_scale, softcap)


@_split_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, causal, softmax_scale, softcap):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=torch.float32))


def split_forward(q, k, v, prefix_k, prefix_v, mask, prefix_ids: Optional[torch.Tensor],
                  prefix_lengths: Optional[torch.Tensor], causal: bool, softmax_scale: float, softcap: float,
                  direct: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton decode path -> (out like q, lse float32 [B, Hq, Lq]): two launches, split-KV over the text and the
    prefix (``prefix_attn/triton/decode_launch.py``). ``direct``: the launcher itself (eager inference), else the
    custom op ``prefix_attn::decode_split``. Reads no value on the host with a shared prefix (a CUDA graph can
    capture it); a bank groups its rows by entry once per ``prefix_ids`` tensor."""
    run = _split_launch if direct else _split_op
    return run(q, k, v, prefix_k, prefix_v, mask, prefix_ids, prefix_lengths, bool(causal), float(softmax_scale),
               float(softcap))
