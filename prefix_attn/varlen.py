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

Backends: ``triton`` runs the padded op's kernels with a compile-time VARLEN switch (sequence s is "batch row"
s, its offsets read from cu_seqlens; no padding in memory, no per-sequence loop); ``cpu`` calls the native
kernel once per sequence on views of the packed tensors (no copies); ``torch`` is the reference, the padded
reference per sequence. The prefix gradients are summed over all sequences, deterministically.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dropout as _dropout
from . import ops
from .reference import prefix_attention_reference

__all__ = ["prefix_attention_varlen", "prefix_attention_varlen_reference"]


def _seqs(cu_q: torch.Tensor, cu_k: torch.Tensor):
    return list(zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:]))


def _as4(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of a packed [total, H, D] tensor as a [1, H, rows, D] view."""
    return t[lo:hi].transpose(0, 1).unsqueeze(0)


def prefix_attention_varlen_reference(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, *, causal=True,
                                      softmax_scale=None, softcap=0.0, prefix_ids=None, prefix_lengths=None,
                                      dropout_p=0.0, dropout_seed=None, compute_dtype=None):
    """The padded reference run on each sequence alone (sequence s is dropout row s); differentiable, the oracle
    of the varlen tests."""
    outs = []
    for s, (q0, q1, k0, k1) in enumerate(_seqs(cu_seqlens_q, cu_seqlens_k)):
        bank = {}
        if prefix_ids is not None:
            bank = {"prefix_ids": prefix_ids[s:s + 1], "prefix_lengths": prefix_lengths}
        o = prefix_attention_reference(_as4(q, q0, q1), _as4(k, k0, k1), _as4(v, k0, k1), prefix_k, prefix_v,
                                       causal=causal, softmax_scale=softmax_scale, softcap=softcap,
                                       dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_batch_offset=s,
                                       compute_dtype=compute_dtype, **bank)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0)


def _check_varlen(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, prefix_ids, prefix_lengths) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, heads_q, head_dim] (rank 3, packed), got shape {ops._shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_k, heads_kv, head_dim] (rank 3, packed), got shape "
                             f"{ops._shape(t)}")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32/int64 torch.Tensor [num_sequences + 1], got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got dtype {t.dtype}")
        if t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"{name} must be [num_sequences + 1], got shape {ops._shape(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (num_sequences + 1), got "
                         f"{cu_q.numel()} and {cu_k.numel()}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{name} must be an int >= 0, got {m!r}")
    # the padded op's checks on one sequence-shaped view: heads, head_dim, dtypes, devices, prefix and bank
    num_seq = cu_q.numel() - 1
    ops._check_inputs(_as4(q, 0, 0).expand(num_seq, -1, -1, -1), _as4(k, 0, 0).expand(num_seq, -1, -1, -1),
                      _as4(v, 0, 0).expand(num_seq, -1, -1, -1), prefix_k, prefix_v, None, None, 0.0, prefix_ids,
                      prefix_lengths)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [total_k, heads_kv, head_dim], got k {ops._shape(k)} "
                         f"and v {ops._shape(v)}")


def _check_offsets(q, k, cu_q, cu_k, max_q, max_k) -> None:
    """Values of cu_seqlens (one host sync): run inside the op, never traced."""
    for name, cu, total, mx, of in (("cu_seqlens_q", cu_q, q.shape[0], max_q, "q"),
                                    ("cu_seqlens_k", cu_k, k.shape[0], max_k, "k")):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {c[0]}")
        lens = [b - a for a, b in zip(c[:-1], c[1:])]
        if any(n < 0 for n in lens):
            raise ValueError(f"{name} must be non-decreasing, got {c}")
        if c[-1] != total:
            raise ValueError(f"{name}[-1] = {c[-1]} must be the total length {total} ({of}.shape[0])")
        if lens and max(lens) > mx:
            raise ValueError(f"max_seqlen_{of} = {mx} is smaller than the longest sequence ({max(lens)})")
    for s, (q0, q1, k0, k1) in enumerate(_seqs(cu_q, cu_k)):
        if q1 - q0 > k1 - k0:
            raise ValueError(f"sequence {s} has len_q = {q1 - q0} > len_k = {k1 - k0}: queries are the last len_q "
                             f"positions of their sequence")


def _cpu_fwd(q, k, v, pk, pv, cu_q, cu_k, causal, scale, softcap, prefix_ids, prefix_lengths, drop):
    from . import cpu  # noqa: PLC0415

    out = torch.empty(q.shape, dtype=q.dtype)
    # the CPU kernel's lse: float64 for float64 inputs, float32 otherwise
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    for s, (q0, q1, k0, k1) in enumerate(_seqs(cu_q, cu_k)):
        bank = {} if prefix_ids is None else {"prefix_ids": prefix_ids[s:s + 1], "prefix_lengths": prefix_lengths}
        o, l_s = cpu.prefix_attn_fwd(_as4(q, q0, q1), _as4(k, k0, k1), _as4(v, k0, k1), pk, pv, None, causal, scale,
                                     softcap, **bank, **drop, dropout_batch_offset=s)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l_s[0]
    return out, lse


def _cpu_bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, causal, scale, softcap, needs, prefix_ids,
             prefix_lengths, drop):
    from . import cpu  # noqa: PLC0415

    need_dq, need_dkv, need_dprefix = needs
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dpk = torch.zeros(pk.shape, dtype=torch.float32 if pk.dtype != torch.float64 else torch.float64)
    dpv = torch.zeros_like(dpk)
    for s, (q0, q1, k0, k1) in enumerate(_seqs(cu_q, cu_k)):
        if q1 == q0:
            continue
        bank = {} if prefix_ids is None else {"prefix_ids": prefix_ids[s:s + 1], "prefix_lengths": prefix_lengths}
        g = cpu.prefix_attn_bwd(_as4(dout, q0, q1), _as4(q, q0, q1), _as4(k, k0, k1), _as4(v, k0, k1), pk, pv, None,
                                _as4(out, q0, q1), lse[:, q0:q1].unsqueeze(0), causal, scale, softcap,
                                need_dq=need_dq, need_dkv=need_dkv, need_dprefix=need_dprefix, **bank, **drop,
                                dropout_batch_offset=s)
        if need_dq:
            dq[q0:q1] = g[0][0].transpose(0, 1)
        if need_dkv:
            dk[k0:k1] = g[1][0].transpose(0, 1)
            dv[k0:k1] = g[2][0].transpose(0, 1)
        if need_dprefix:  # summed over the sequences in order: deterministic
            dpk += g[3]
            dpv += g[4]
    return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype)


@torch.library.custom_op("prefix_attn::varlen_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   prefix_ids: Optional[torch.Tensor], prefix_lengths: Optional[torch.Tensor], causal: bool,
                   softmax_scale: float, softcap: float, dropout_p: float, dropout_seed: Optional[torch.Tensor],
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    ops._check_bank_values(prefix_k, prefix_ids, prefix_lengths)
    drop = dict(dropout_p=dropout_p, dropout_seed=dropout_seed)
    if backend == "cpu":
        return _cpu_fwd(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, softcap,
                        prefix_ids, prefix_lengths, drop)
    return ops._backend_module(backend).prefix_attn_fwd(
        q, k, v, prefix_k, prefix_v, None, causal, softmax_scale, softcap, prefix_ids=prefix_ids,
        prefix_lengths=prefix_lengths, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **drop)


@_varlen_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, prefix_ids, prefix_lengths, causal, softmax_scale,
      softcap, dropout_p, dropout_seed, backend):
    lse_dtype = torch.float64 if (q.dtype == torch.float64 and backend == "cpu") else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((q.shape[1], q.shape[0]),
                                                                                   dtype=lse_dtype)


@torch.library.custom_op("prefix_attn::varlen_bwd", mutates_args=())
def _varlen_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                   prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   prefix_ids: Optional[torch.Tensor], prefix_lengths: Optional[torch.Tensor], causal: bool,
                   softmax_scale: float, softcap: float, dropout_p: float, dropout_seed: Optional[torch.Tensor],
                   backend: str, need_dq: bool, need_dkv: bool,
                   need_dprefix: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    drop = dict(dropout_p=dropout_p, dropout_seed=dropout_seed)
    if backend == "cpu":
        grads = _cpu_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                         softmax_scale, softcap, (need_dq, need_dkv, need_dprefix), prefix_ids, prefix_lengths, drop)
    else:
        grads = ops._backend_module(backend).prefix_attn_bwd(
            dout, q, k, v, prefix_k, prefix_v, None, out, lse, causal, softmax_scale, softcap, need_dq=need_dq,
            need_dkv=need_dkv, need_dprefix=need_dprefix, prefix_ids=prefix_ids, prefix_lengths=prefix_lengths,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, **drop)
    return ops._op_grads(q, grads)


@_varlen_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, cu_q, cu_k, max_q, max_k, prefix_ids, prefix_lengths, causal,
      softmax_scale, softcap, dropout_p, dropout_seed, backend, need_dq, need_dkv, need_dprefix):
    return ops._fake_grads(q, k, v, prefix_k, prefix_v, need_dq, need_dkv, need_dprefix)


class PrefixAttentionVarlenFunction(torch.autograd.Function):
    """Packed prefix attention with a fused backward. Not for direct use: call ``prefix_attention_varlen``."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, prefix_ids, prefix_lengths, causal,
                softmax_scale, softcap, dropout_p, dropout_seed, backend):
        out, lse = _varlen_fwd_op(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, prefix_ids, prefix_lengths,
                                  causal, softmax_scale, softcap, dropout_p, dropout_seed, backend)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, cu_q, cu_k, prefix_ids, prefix_lengths,
                              dropout_seed)
        ctx.args = (max_q, max_k, causal, softmax_scale, softcap, dropout_p, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, out, lse, cu_q, cu_k, prefix_ids, prefix_lengths, seed = ctx.saved_tensors
        max_q, max_k, causal, softmax_scale, softcap, dropout_p, backend = ctx.args
        needs = ctx.needs_input_grad
        grads = _varlen_bwd_op(
            dout.contiguous(), q, k, v, prefix_k, prefix_v, out, lse, cu_q, cu_k, max_q, max_k, prefix_ids,
            prefix_lengths, causal, softmax_scale, softcap, dropout_p, seed, backend, needs[0], needs[1] or needs[2],
            needs[3] or needs[4])
        return ops._input_grads(needs, grads, 12)


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
    if isinstance(q, torch.Tensor):
        (q, k, v, prefix_k, prefix_v), autocast = ops._autocast_inputs(q, k, v, prefix_k, prefix_v)
        if autocast:  # as prefix_attention: the autocast dtype, differentiable casts
            with torch.autocast(q.device.type, enabled=False):
                return prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                               softcap=softcap, prefix_ids=prefix_ids, prefix_lengths=prefix_lengths,
                                               dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend)
    _check_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_ids,
                  prefix_lengths)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = no capping), got {softcap!r}")
    dropout_p, seed = _dropout.prepare(dropout_p, dropout_seed, q.device)
    backend = ops._pick_backend(q, backend)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "torch":
        if not torch.compiler.is_compiling():
            _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
            ops._check_bank_values(prefix_k, prefix_ids, prefix_lengths)
        return prefix_attention_varlen_reference(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k,
                                                 causal=bool(causal), softmax_scale=scale, softcap=float(softcap),
                                                 prefix_ids=prefix_ids, prefix_lengths=prefix_lengths,
                                                 dropout_p=dropout_p, dropout_seed=None if seed is None else int(seed))
    if backend == "triton" and q.dtype == torch.float64 and q.is_cuda:
        raise TypeError("the Triton kernels take float16, bfloat16 or float32 on the GPU, got float64")
    return PrefixAttentionVarlenFunction.apply(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k,
                                               int(max_seqlen_q), int(max_seqlen_k), prefix_ids, prefix_lengths,
                                               bool(causal), scale, float(softcap), dropout_p, seed, backend)
