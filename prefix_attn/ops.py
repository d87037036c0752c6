"""The op: one autograd Function and one pair of custom ops for padded and packed inputs, and the two front doors.

Name chain::

    _prefix_attn_fwd_kernel / _bwd_*        prefix_attn/triton/kernels.py + kernels_bwd.py, csrc/prefix_attn_cpu.cpp
    prefix_attn_fwd / prefix_attn_bwd       launchers, one pair per backend module (see backends.py)
    prefix_attn::fwd / prefix_attn::bwd     custom ops (this module): opaque to torch.compile, values checked once
    PrefixAttentionFunction                 autograd: padded, or packed when cu_seqlens are given
    prefix_attention                        front door, padded [batch, heads, len, head_dim] (this module)
    prefix_attention_varlen                 front door, packed [total, heads, head_dim] (varlen.py)

Argument checks live in ``checks.py``, the backend choice in ``backends.py``. Inside the ops ``attention_mask`` is
None or a bool ``[batch, len_k]`` tensor, ``softmax_scale`` a float, ``softcap`` a float (0 = off), ``prefix_ids``
None or an int tensor ``[rows]`` (``prefix_k`` a bank ``[N, Hkv, P, D]``), ``prefix_lengths`` None or int ``[N]``,
``cu_seqlens_q/k`` None (padded) or int ``[S + 1]`` (packed, with ``max_seqlen_q/k``), ``dropout_seed`` an int64
0-d tensor on the inputs' device (None when ``dropout_p`` is 0). ``lse`` is float32 ``[batch, heads_q, len_q]``
(packed: ``[heads_q, total_q]``; the CPU kernel keeps float64 for float64 inputs), natural log, +inf where a query
sees no key.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends, checks, decode
from . import dropout as _dropout
from .backends import BACKENDS, available_backends  # noqa: F401  (re-exported)
from .backends import cpu_status as _cpu_status  # noqa: F401  (re-exported for the tests)
from .reference import prefix_attention_reference, prefix_attention_varlen_reference

__all__ = ["prefix_attention", "PrefixAttentionFunction", "available_backends", "BACKENDS"]

TRITON_MAX_HEAD_DIM = 256


def _pick_backend(q: torch.Tensor, backend: Optional[str]) -> str:
    return backends.resolve(q.device.type, backend)


_NO_SCOPE = contextlib.nullcontext()  # reusable: it holds no state


def autocast_inputs(q, k, v, prefix_k, prefix_v):
    """Under ``torch.autocast`` on q's device type: q, k, v and the prefix cast to the autocast dtype (floating
    tensors other than float64), as SDPA's inputs are, and a context that turns autocast off for the op; else the
    tensors unchanged and a null context. Under autocast RoPE promotes q and k to float32 while v stays 16-bit;
    the casts are differentiable, so every gradient (the prefix's too) comes back in its input's own dtype. The
    front doors call it before their checks (which then see one dtype)."""
    tensors = (q, k, v, prefix_k, prefix_v)
    device_type = ("cuda" if q.is_cuda else "cpu" if q.is_cpu else None) if isinstance(q, torch.Tensor) else None
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return tensors, _NO_SCOPE
    dtype = torch.get_autocast_dtype(device_type)
    cast = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
    return cast, torch.autocast(device_type, enabled=False)  # the kernels run in the cast dtype


def _check_values(q, k, prefix_k, prefix_ids, prefix_lengths, cu_q, cu_k, max_q, max_k) -> None:
    """The host-read checks (memoised per tensor, see checks.py)."""
    if cu_q is not None:
        checks.check_offsets(q, k, cu_q, cu_k, max_q, max_k)
    checks.bank_values(prefix_k, prefix_ids, prefix_lengths)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _launch_fwd(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, dropout_p, dropout_seed, backend):
    """The forward op's body: the value checks, then the backend's launcher -> (out, lse)."""
    _check_values(q, k, prefix_k, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return backends.module(backend).prefix_attn_fwd(
        q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap, prefix_ids=prefix_ids,
        prefix_lengths=prefix_lengths, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, dropout_seed=dropout_seed)


def _lse_shape(q, packed: bool):
    return (q.shape[1], q.shape[0]) if packed else q.shape[:3]


# The launchers as torch.library custom ops: opaque to torch.compile (no graph break, shapes from the fake
# implementations below), and the path of eager training; eager inference calls the launchers directly (apply).
@torch.library.custom_op("prefix_attn::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
            attention_mask: Optional[torch.Tensor], prefix_ids: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool,
            softmax_scale: float, softcap: float, dropout_p: float, dropout_seed: Optional[torch.Tensor],
            backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q,
                       cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, dropout_p,
                       dropout_seed, backend)


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, dropout_p, dropout_seed, backend):
    # the CPU kernel keeps lse in float64 for float64 inputs (gradcheck precision); float32 everywhere else
    lse_dtype = torch.float64 if (q.dtype == torch.float64 and backend == "cpu") else torch.float32
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=lse_dtype))


@torch.library.custom_op("prefix_attn::bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
            prefix_v: torch.Tensor, attention_mask: Optional[torch.Tensor], prefix_ids: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, out: torch.Tensor,
            lse: torch.Tensor, causal: bool, softmax_scale: float, softcap: float, dropout_p: float,
            dropout_seed: Optional[torch.Tensor], backend: str, need_dq: bool, need_dkv: bool,
            need_dprefix: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _launch_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, causal, softmax_scale, softcap, dropout_p,
                        dropout_seed, backend, need_dq, need_dkv, need_dprefix)
    # custom ops return tensors, never None: an unneeded gradient comes back as an empty tensor (one each: outputs
    # must not alias one another)
    dq, dk, dv, dpk, dpv = grads
    return (q.new_empty(0) if dq is None else dq, q.new_empty(0) if dk is None else dk,
            q.new_empty(0) if dv is None else dv, q.new_empty(0) if dpk is None else dpk,
            q.new_empty(0) if dpv is None else dpv)


@_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, out, lse, causal, softmax_scale, softcap, dropout_p, dropout_seed, backend,
      need_dq, need_dkv, need_dprefix):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else q.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv), like(prefix_k, need_dprefix),
            like(prefix_v, need_dprefix))


def _below_autograd(op, *args):
    """``op(*args)`` from the autograd Function's forward or backward when a dispatch mode, a tensor subclass or a
    tracer must see the op (see :func:`_direct`). There, in eager mode, grad mode is off and the custom op's own
    autograd kernel (torch.library's, in Python) would only pass the call on to the device kernel: the call skips
    that dispatch key (about 6 us of host time per op call). Dispatch modes and tensor subclasses still see the op
    (they sit below autograd); torch.compile traces the plain call; a backward with create_graph=True (grad mode
    on) keeps the autograd kernel, which refuses a double backward as before."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def _unwatched(a, b, c, d, e) -> bool:
    """Whether nothing can watch a call on these tensors: not compiling or tracing, plain tensors, no dispatch mode.
    Everything that can (torch.compile, jit tracing, dispatch modes, tensor subclasses) must see the custom ops."""
    # is_compiling first: dynamo must not trace the dispatch-mode query (a graph break)
    return (not torch.compiler.is_compiling() and type(a) in _PLAIN and type(b) in _PLAIN and type(c) in _PLAIN
            and type(d) in _PLAIN and type(e) in _PLAIN and _get_current_dispatch_mode() is None
            and not torch.jit.is_tracing())


def _direct(a, b, c, d, e) -> bool:
    """Whether the autograd Function may call the launcher itself, without the custom op's dispatch (about 8 us of
    host time per op call): grad mode off (a backward with create_graph=True keeps the op, whose autograd kernel
    refuses a double backward) and nothing watching (:func:`_unwatched`)."""
    return not torch.is_grad_enabled() and _unwatched(a, b, c, d, e)


def _launch_bwd(dout, q, k, v, prefix_k, prefix_v, mask, ids, lengths, cu_q, cu_k, max_q, max_k, out, lse, causal,
                softmax_scale, softcap, dropout_p, seed, backend, need_dq, need_dkv, need_dprefix):
    """The backward op's launcher call -> (dq, dk, dv, dprefix_k, dprefix_v), None where not needed."""
    return backends.module(backend).prefix_attn_bwd(
        dout, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, softmax_scale, softcap,
        need_dq=need_dq, need_dkv=need_dkv, need_dprefix=need_dprefix, prefix_ids=ids, prefix_lengths=lengths,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=dropout_p,
        dropout_seed=seed)


class PrefixAttentionFunction(torch.autograd.Function):
    """Fused prefix attention with a fused backward, padded or (with cu_seqlens) packed. Not for direct use: call
    ``prefix_attention`` or ``prefix_attention_varlen``. In eager mode with plain tensors forward and backward call
    the launchers themselves; otherwise (see :func:`_direct`) the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, dropout_p, dropout_seed,
                backend):
        args = (q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, dropout_p, dropout_seed, backend)
        if _direct(q, k, v, prefix_k, prefix_v):
            out, lse = _launch_fwd(*args)
        else:
            out, lse = _below_autograd(_fwd_op, *args)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, attention_mask, prefix_ids, prefix_lengths,
                              cu_seqlens_q, cu_seqlens_k, dropout_seed)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, dropout_p, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, out, lse, mask, ids, lengths, cu_q, cu_k, seed = ctx.saved_tensors
        max_q, max_k, causal, softmax_scale, softcap, dropout_p, backend = ctx.args
        needs = ctx.needs_input_grad
        args = (dout, q, k, v, prefix_k, prefix_v, mask, ids, lengths, cu_q, cu_k, max_q, max_k, out, lse, causal,
                softmax_scale, softcap, dropout_p, seed, backend, needs[0], needs[1] or needs[2], needs[3] or needs[4])
        if type(dout) in _PLAIN and _direct(q, k, v, prefix_k, prefix_v):
            dq, dk, dv, dpk, dpv = _launch_bwd(*args)
        else:
            dq, dk, dv, dpk, dpv = _below_autograd(_bwd_op, *args)
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dpk if needs[3] else None, dpv if needs[4] else None) + (None,) * 13


def apply(q, k, v, prefix_k, prefix_v, *, attention_mask=None, prefix_ids=None, prefix_lengths=None,
          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, causal=True, softmax_scale=None,
          softcap=0.0, dropout_p=0.0, dropout_seed=None, backend=None) -> torch.Tensor:
    """What both front doors run after their autocast casts and shape checks: dropout, the backend, the softmax
    scale, then the reference or the autograd Function."""
    packed = cu_seqlens_q is not None
    dropout_p, seed = _dropout.prepare(dropout_p, dropout_seed, q.device)
    backend = _pick_backend(q, backend)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(torch.bool)
    causal, softcap = bool(causal), float(softcap)
    compiling = torch.compiler.is_compiling()
    if backend == "torch" or (not packed and q.shape[2] == 0):
        if not compiling:
            _check_values(q, k, prefix_k, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k)
        drop = dict(dropout_p=dropout_p, dropout_seed=None if seed is None else int(seed))
        bank = dict(prefix_ids=prefix_ids, prefix_lengths=prefix_lengths)
        if packed:
            return prefix_attention_varlen_reference(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k,
                                                     causal=causal, softmax_scale=scale, softcap=softcap, **bank,
                                                     **drop)
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=scale,
                                          attention_mask=mask, softcap=softcap, **bank, **drop)
    if backend == "triton":
        if head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"head_dim={head_dim} is above the Triton kernels' limit of {TRITON_MAX_HEAD_DIM}")
        if q.dtype == torch.float64 and q.is_cuda:
            raise TypeError("the Triton kernels take float16, bfloat16 or float32 on the GPU, got float64")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                              or prefix_k.requires_grad or prefix_v.requires_grad)
    # eager inference (generate()): the launcher itself, without the custom op's and autograd's dispatch (about
    # 25 us a call, more than a decode step's kernel at B = 1); torch.compile and training go through both
    # (plain tensors, no dispatch mode or tracer watching: those see the custom op)
    direct = not needs_grad and _unwatched(q, k, v, prefix_k, prefix_v)
    forward = _launch_fwd if direct else _fwd_op
    if decode.applies(q, prefix_k, prefix_v, packed, dropout_p, needs_grad, backend) and not (
            prefix_ids is not None and compiling):  # a bank groups its rows on the host
        _check_values(q, k, prefix_k, prefix_ids, prefix_lengths, None, None, 0, 0)
        if backend == "triton":  # split-KV decoding: two launches (decode.split_forward)
            return decode.split_forward(q, k, v, prefix_k, prefix_v, mask, prefix_ids, prefix_lengths, causal, scale,
                                        softcap, direct)[0]

        empty = prefix_k.new_empty(k.shape[1], 0, head_dim)

        def attend(q_, k_, v_, causal_, mask_):
            return forward(q_, k_, v_, empty, empty, mask_, None, None, None, None, 0, 0, causal_, scale, softcap,
                           0.0, None, backend)

        return decode.forward(attend, q, k, v, prefix_k, prefix_v, mask, prefix_ids, prefix_lengths, causal)[0]
    if direct:
        return _launch_fwd(q, k, v, prefix_k, prefix_v, mask, prefix_ids, prefix_lengths, cu_seqlens_q, cu_seqlens_k,
                           int(max_seqlen_q), int(max_seqlen_k), causal, scale, softcap, dropout_p, seed, backend)[0]
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, mask, prefix_ids, prefix_lengths, cu_seqlens_q,
                                         cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale, softcap,
                                         dropout_p, seed, backend)


def prefix_attention(
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
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over a shared prefix K/V block (or one entry of a bank per row) plus the text K/V, without
    expanding the prefix.

    Args:
        q:              ``[batch, heads_q, len_q, head_dim]``
        k, v:           ``[batch, heads_kv, len_k, head_dim]``; ``heads_q % heads_kv == 0``; ``len_q <= len_k`` when
                        ``causal`` (any ``len_q`` otherwise: a cross-attention's queries)
        prefix_k/v:     ``[heads_kv, P, head_dim]``, read in place for every batch row; ``P`` may be 0;
                        with ``prefix_ids`` a bank ``[N, heads_kv, P, head_dim]``, also read in place
        causal:         text query ``i`` (text position ``len_k - len_q + i``) sees text keys ``j <= len_k - len_q + i``
        softmax_scale:  default ``head_dim ** -0.5``
        attention_mask: ``[batch, len_k]`` bool or 0/1 int, 1 = text key visible; prefix slots are always visible
        softcap:        > 0 caps every score (prefix and text) as ``softcap * tanh(score / softcap)`` before the
                        softmax (flash-attention's ``softcap``, Gemma 2's ``attn_logit_softcapping``); 0 = off
        prefix_ids:     int ``[batch]`` with values in ``[0, N)``: row ``b`` sees bank entry ``prefix_ids[b]`` only
        prefix_lengths: int ``[N]``, ``0 <= prefix_lengths[n] <= P``: entry ``n`` has its first
                        ``prefix_lengths[n]`` slots only (the rest are invisible and get zero gradient)
        dropout_p:      in ``[0, 1)``: attention dropout after the softmax, prefix and text columns alike (each
                        probability kept with probability ``1 - dropout_p`` and scaled by ``1 / (1 - dropout_p)``),
                        as ``F.dropout(softmax(scores)) @ V``; the mask is regenerated in backward, never stored
        dropout_seed:   int in ``[0, 2**63)``: the keep mask is ``prefix_attn.dropout_mask(..., seed)`` on every
                        backend; None draws a seed from torch's generator of the inputs' device
        backend:        None (CUDA -> "triton", CPU -> "cpu" if built else "torch"; the environment variable
                        ``PREFIX_ATTN_BACKEND`` overrides that choice), or force one of those

    Returns:
        ``[batch, heads_q, len_q, head_dim]`` in the dtype of ``q``.

    Which keys a query sees, for ``len_q == len_k == 3`` and ``P == 2`` (causal)::

                    prefix | text keys
          query 0   1 1    | 1 0 0
          query 1   1 1    | 1 1 0
          query 2   1 1    | 1 1 1

    With ``len_q < len_k`` (decoding) the queries are the last rows of that picture (bottom-right
    aligned). A query that sees no key at all (``P == 0`` and fully padded) outputs zeros.
    Gradients flow to all five tensors; the prefix gradients are summed over the batch rows (with a bank:
    each entry's gradient over the rows that chose it, zero for entries no row chose), deterministically.
    """
    (q, k, v, prefix_k, prefix_v), scope = autocast_inputs(q, k, v, prefix_k, prefix_v)
    checks.check_padded(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap, prefix_ids,
                        prefix_lengths, causal=bool(causal))
    checks.mask_values(attention_mask)  # an integer mask: 0 and 1 only (memoised per tensor)
    with scope:
        return apply(q, k, v, prefix_k, prefix_v, attention_mask=attention_mask, prefix_ids=prefix_ids,
                     prefix_lengths=prefix_lengths, causal=causal, softmax_scale=softmax_scale, softcap=softcap,
                     dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend)
