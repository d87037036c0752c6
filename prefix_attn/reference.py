"""Plain PyTorch prefix attention: the test oracle, the ``"torch"`` backend and the benchmark baseline.

Shapes are those of the public functions (``prefix_attention`` in ``ops.py``, ``prefix_attention_varlen`` in
``varlen.py``); ``lse`` as in the ``ops.py`` module docstring, but -inf where a query sees no key. A packed batch
(``prefix_attention_varlen_reference``) runs each sequence as a batch of one.

This implementation does exactly what the fused kernels avoid: it expands the prefix over the batch,
concatenates it with the text keys/values and materialises the full score matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dropout import dropout_mask

__all__ = ["visible_mask", "prefix_attention_reference", "prefix_attention_varlen_reference", "attention_flops"]


def visible_mask(
    len_q: int,
    len_k: int,
    num_prefix: int,
    *,
    causal: bool = True,
    attention_mask: Optional[torch.Tensor] = None,
    device=None,
    row_prefix_lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Which keys each query sees, over ``[prefix | text]``.

    Returns a bool tensor ``[batch or 1, 1, len_q, num_prefix + len_k]``. Query ``i`` sits at text
    position ``len_k - len_q + i`` (bottom-right alignment) and sees every prefix slot (or, with
    ``row_prefix_lengths [batch]``, the first ``row_prefix_lengths[b]`` of them), plus text key
    ``j`` when ``j <= len_k - len_q + i`` (if ``causal``) and ``attention_mask[b, j]`` (if given).
    """
    if attention_mask is not None:
        device = attention_mask.device
    qpos = torch.arange(len_q, device=device) + (len_k - len_q)
    kpos = torch.arange(len_k, device=device)
    text = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if causal:
        text = kpos[None, :] <= qpos[:, None]
    text = text[None, None]  # [1, 1, len_q, len_k]
    if attention_mask is not None:
        text = text & attention_mask.to(torch.bool)[:, None, None, :]
    prefix = torch.ones(text.shape[0], 1, len_q, num_prefix, dtype=torch.bool, device=device)
    if row_prefix_lengths is not None:
        slots = torch.arange(num_prefix, device=device) < row_prefix_lengths.to(device)[:, None]  # [B, P]
        prefix = slots[:, None, None, :].expand(-1, 1, len_q, -1)
        text = text.expand(prefix.shape[0], -1, -1, -1)
    return torch.cat([prefix, text], dim=-1)


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
    prefix_ids: Optional[torch.Tensor] = None,
    prefix_lengths: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    dropout_batch_offset: int = 0,
    compute_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
):
    """Expand + concat + masked softmax, differentiable by PyTorch autograd.

    With ``prefix_ids [B]`` the prefix is a bank ``[N, Hkv, P, D]`` and row ``b`` uses entry ``prefix_ids[b]``
    (gathered here, so the bank's gradient is the sum over the rows that chose each entry);
    ``prefix_lengths [N]`` hides the slots of entry ``n`` from ``prefix_lengths[n]`` on.

    ``softcap > 0`` caps every score (prefix and text): ``s -> softcap * tanh(s / softcap)`` before the
    softmax, as flash-attention and Gemma 2 do; 0 leaves the scores as they are.

    ``dropout_p > 0`` drops attention probabilities (prefix and text columns alike) with the keep mask
    ``prefix_attn.dropout.dropout_mask(..., dropout_seed, batch_offset=dropout_batch_offset)`` the kernels use, and
    scales the kept ones by ``1 / (1 - dropout_p)``; ``dropout_seed`` must then be an int. ``lse`` ignores dropout.

    Math runs in ``compute_dtype`` (default: float64 for float64 inputs, float32 otherwise); the
    output has the dtype of ``q``. A query that sees no key at all (possible only with ``P == 0`` and
    a padding mask) gets a zero output, as in flash-attention.
    """
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    num_prefix = prefix_k.shape[-2]
    group = heads_q // heads_kv
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)

    row_lengths = None
    if prefix_ids is not None:
        ids = prefix_ids.to(device=prefix_k.device, dtype=torch.long)
        if prefix_lengths is not None:
            row_lengths = prefix_lengths.to(device=q.device, dtype=torch.long)[ids.to(q.device)]

    def full(prefix: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if prefix_ids is not None:
            expanded = prefix[ids]  # [B, Hkv, P, D], a gather: its backward sums the rows of each entry
        else:
            expanded = prefix.unsqueeze(0).expand(batch, -1, -1, -1)  # [B, Hkv, P, D]
        kv = torch.cat([expanded.to(compute_dtype), text.to(compute_dtype)], dim=2)
        return kv.repeat_interleave(group, dim=1) if group > 1 else kv  # [B, Hq, P+Tk, D]

    keys, values = full(prefix_k, k), full(prefix_v, v)
    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = visible_mask(
        len_q, len_k, num_prefix, causal=causal, attention_mask=attention_mask, device=q.device,
        row_prefix_lengths=row_lengths,
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # a row that sees no key: 0 (its weights are 0); +inf stays, so that exp(inf - inf) makes the row NaN as in
    # plain attention
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0:
        if dropout_seed is None:
            raise ValueError("the reference needs an int dropout_seed with dropout_p > 0")
        keep = dropout_mask(batch, heads_q, len_q, num_prefix, len_k, dropout_p, int(dropout_seed), device=q.device,
                            batch_offset=dropout_batch_offset)
        probs = probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))
    out = torch.matmul(probs, values).to(q.dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of a packed [total, H, D] tensor as a [1, H, rows, D] view."""
    return t[lo:hi].transpose(0, 1).unsqueeze(0)


def prefix_attention_varlen_reference(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, *, causal=True,
                                      softmax_scale=None, softcap=0.0, prefix_ids=None, prefix_lengths=None,
                                      dropout_p=0.0, dropout_seed=None, compute_dtype=None):
    """The padded reference run on each packed sequence alone (sequence s is dropout row s); differentiable, the
    oracle of the packed tests. -> ``[total_q, heads_q, head_dim]``."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(cq) - 1):
        bank = {}
        if prefix_ids is not None:
            bank = {"prefix_ids": prefix_ids[s:s + 1], "prefix_lengths": prefix_lengths}
        o = prefix_attention_reference(_rows(q, cq[s], cq[s + 1]), _rows(k, ck[s], ck[s + 1]),
                                       _rows(v, ck[s], ck[s + 1]), prefix_k, prefix_v, causal=causal,
                                       softmax_scale=softmax_scale, softcap=softcap, dropout_p=dropout_p,
                                       dropout_seed=dropout_seed, dropout_batch_offset=s, compute_dtype=compute_dtype,
                                       **bank)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0)


def attention_flops(batch: int, heads_q: int, len_q: int, len_k: int, num_prefix: int, head_dim: int,
                    causal: bool = True) -> Tuple[float, float]:
    """(forward, backward) FLOPs by flash-attention's convention: fwd = 4*B*Hq*Lq*D*(P + visible text),
    bwd = 2.5 * fwd. With causal text and Lq == Lk the visible text counts as Lk / 2."""
    text = (len_k - len_q) + len_q / 2 if causal else len_k
    fwd = 4.0 * batch * heads_q * len_q * head_dim * (num_prefix + text)
    return fwd, 2.5 * fwd
