"""The decode path: a few queries per row (``len_q <= DECODE_MAX_LEN_Q``) and no gradient, as in ``generate()``.

The prefix is shared by the rows (or, with a bank, by the rows that chose one entry), so its part of the
attention is one product per kv head for all of them: the queries of every row and of every query head of a GQA
group folded into the M dimension, ``[heads_kv, rows * group * len_q, D] @ [heads_kv, D, P]`` (Hydragen,
FlashInfer's cascade). The prefix is read once, not once per row. The text part (each row's own cache) runs
through the backend's kernel with an empty prefix. The two parts are merged by their log-sum-exp.

Shapes as in ``prefix_attention``. The merged ``lse`` keeps the kernels' convention: ``+inf`` for a query that
sees no key at all.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks

DECODE_MAX_LEN_Q = 16
# below this many prefix queries per kv head (rows * group * len_q) the fused kernel is as fast: one launch
DECODE_MIN_ROWS = 8


def applies(q, prefix_k, prefix_v, packed: bool, dropout_p: float, needs_grad: bool) -> bool:
    """Whether a forward takes the decode path (``generate()`` does, with no option)."""
    if packed or needs_grad or dropout_p > 0 or q.shape[2] > DECODE_MAX_LEN_Q or prefix_k.shape[-2] == 0:
        return False
    rows = q.shape[0] * q.shape[1] // prefix_k.shape[-3] * q.shape[2]
    if prefix_k.dim() == 4:  # a bank: rows per entry used
        rows = rows // max(prefix_k.shape[0], 1)
    return rows >= DECODE_MIN_ROWS


def _prefix_part(q, pk, pv, scale: float, softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[R, Hq, Lq, D]``, pk/pv ``[Hkv, P, D]`` -> out ``[R, Hq, Lq, D]`` float32, lse ``[R, Hq, Lq]``."""
    rows, heads_q, len_q, head_dim = q.shape
    heads_kv = pk.shape[0]
    group = heads_q // heads_kv
    qf = q.reshape(rows, heads_kv, group * len_q, head_dim).transpose(0, 1).reshape(heads_kv, -1, head_dim)
    if qf.dtype != torch.float32 and qf.dtype != torch.float64:
        qf, pk, pv = qf.float(), pk.float(), pv.float()
    s = torch.bmm(qf, pk.to(qf.dtype).transpose(1, 2)).mul_(scale)  # [Hkv, M, P]
    if softcap > 0:
        s = torch.tanh(s.div_(softcap)).mul_(softcap)
    lse = torch.logsumexp(s, -1)
    out = torch.bmm(torch.exp(s.sub_(lse[..., None])), pv.to(qf.dtype))  # [Hkv, M, D]
    out = out.view(heads_kv, rows, group * len_q, head_dim).transpose(0, 1).reshape(rows, heads_q, len_q, head_dim)
    return out, lse.view(heads_kv, rows, group * len_q).transpose(0, 1).reshape(rows, heads_q, len_q)


def _groups(values, device):
    """[(entry, its rows as an int64 tensor)] for the entries some row chose (one host-to-device copy each)."""
    rows = {}
    for b, e in enumerate(values):
        rows.setdefault(e, []).append(b)
    return [(e, torch.tensor(r, dtype=torch.long, device=device)) for e, r in sorted(rows.items())]


def forward(text_fwd, q, k, v, prefix_k, prefix_v, mask, prefix_ids: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], causal: bool, scale: float,
            softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (out like q, lse [B, Hq, Lq]). ``text_fwd(q, k, v, empty_k, empty_v)``: the backend's forward
    with an empty prefix, -> (out, lse)."""
    heads_kv, head_dim = k.shape[1], q.shape[3]
    empty = prefix_k.new_empty(heads_kv, 0, head_dim)
    out_t, lse_t = text_fwd(q, k, v, empty, empty)
    if prefix_ids is None:
        out_p, lse_p = _prefix_part(q, prefix_k, prefix_v, scale, softcap)
    else:
        out_p = q.new_zeros(q.shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        lse_p = out_p.new_full(q.shape[:3], float("-inf"))
        lengths = None if prefix_lengths is None else checks.host_list(prefix_lengths)
        groups = checks.memo(prefix_ids, "decode_groups", lambda: _groups(checks.host_list(prefix_ids), q.device))
        for entry, rows in groups:
            size = prefix_k.shape[2] if lengths is None else lengths[entry]
            if size == 0:
                continue
            o, s = _prefix_part(q.index_select(0, rows), prefix_k[entry, :, :size], prefix_v[entry, :, :size],
                                scale, softcap)
            out_p.index_copy_(0, rows, o)
            lse_p.index_copy_(0, rows, s.to(lse_p.dtype))
    lse_t = lse_t.to(lse_p.dtype)
    lse_t = lse_t.masked_fill(lse_t == float("inf"), float("-inf"))  # no visible text key
    lse = torch.logaddexp(lse_p, lse_t)
    seen = lse > float("-inf")
    w_p = torch.where(seen, torch.exp(lse_p - lse), 0.0)[..., None]
    w_t = torch.where(seen, torch.exp(lse_t - lse), 0.0)[..., None]
    out = (out_p * w_p).add_(out_t.to(out_p.dtype) * w_t)
    return out.to(q.dtype), lse.masked_fill(~seen, float("inf"))
