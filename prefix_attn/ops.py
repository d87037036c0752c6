"""The public op: input checks, backend choice and the autograd Function.

Name chain::

    _prefix_attn_fwd_kernel / _bwd_*        prefix_attn/triton/kernels.py + kernels_bwd.py, csrc/prefix_attn_cpu.cpp
    prefix_attn_fwd / prefix_attn_bwd       launchers, one pair per backend module
    PrefixAttentionFunction                 autograd, saves (q, k, v, prefix, out, lse, mask, bank, dropout seed)
    prefix_attention                        this module: checks inputs, picks a backend

Every backend module exposes the same two launchers::

    prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap,
                    prefix_ids=None, prefix_lengths=None, dropout_p=0.0, dropout_seed=None) -> (out, lse)
    prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap,
                    need_dq, need_dkv, need_dprefix, prefix_ids=None, prefix_lengths=None, dropout_p=0.0,
                    dropout_seed=None) -> (dq, dk, dv, dprefix_k, dprefix_v)

with ``attention_mask`` either None or a bool ``[batch, len_k]`` tensor, ``softmax_scale`` a float, ``softcap``
a float (0 = no capping, the plain code path; else scores ``s -> softcap * tanh(s / softcap)``), ``prefix_ids``
None (``prefix_k`` is ``[Hkv, P, D]``) or an int tensor ``[batch]`` (``prefix_k`` is a bank ``[N, Hkv, P, D]``),
``prefix_lengths`` None or an int tensor ``[N]``, ``dropout_p`` a float in [0, 1) with ``dropout_seed`` an int64
0-d tensor on the inputs' device (the mask of ``prefix_attn/dropout.py``), ``lse``
a float32 ``[batch, heads_q, len_q]`` natural-log log-sum-exp (+inf where a query sees no key), and
gradients the unneeded ones of which may be None.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Tuple

import torch

from . import dropout as _dropout
from .reference import prefix_attention_reference

__all__ = ["prefix_attention", "PrefixAttentionFunction", "available_backends", "BACKENDS"]

BACKENDS = ("triton", "cpu", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_MAX_HEAD_DIM = 256


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _autocast_inputs(q, k, v, prefix_k, prefix_v):
    """Under ``torch.autocast`` on q's device type: q, k, v and the prefix cast to the autocast dtype (floating
    tensors other than float64), as SDPA's inputs are, and True; else the tensors unchanged and False. Under
    autocast RoPE promotes q and k to float32 while v stays 16-bit; the casts are differentiable, so every
    gradient (the prefix's too) comes back in its input's own dtype."""
    device_type = q.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return (q, k, v, prefix_k, prefix_v), False
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in (q, k, v, prefix_k, prefix_v)), True


def _check_inputs(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap=0.0, prefix_ids=None,
                  prefix_lengths=None) -> None:
    """Raise TypeError/ValueError naming the argument and the expected shape (values of prefix_ids and
    prefix_lengths are checked by _check_bank_values, inside the op, where reading them cannot break a graph)."""
    named = (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads_q, len_q, head_dim] (rank 4), got shape {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads_kv, len_k, head_dim] (rank 4), got shape {_shape(t)}")
    bank = prefix_ids is not None
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if bank and t.dim() != 4:
            raise ValueError(f"with prefix_ids, {name} must be a bank [num_entries, heads_kv, num_prefix, head_dim] "
                             f"(rank 4), got shape {_shape(t)}")
        if not bank and t.dim() == 4:
            raise ValueError(f"{name} has rank 4 (a bank [num_entries, heads_kv, num_prefix, head_dim], shape "
                             f"{_shape(t)}): pass prefix_ids [batch] to say which entry each row uses")
        if not bank and t.dim() != 3:
            raise ValueError(
                f"{name} must be [heads_kv, num_prefix, head_dim] (rank 3, shared by every batch row), "
                f"got shape {_shape(t)}"
            )
    if prefix_lengths is not None and not bank:
        raise ValueError("prefix_lengths needs prefix_ids and a bank prefix [num_entries, heads_kv, num_prefix, "
                         "head_dim]")
    batch, heads_q, len_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [batch, heads_kv, len_k, head_dim], "
                         f"got k {_shape(k)} and v {_shape(v)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape [heads_kv, num_prefix, head_dim], "
                         f"got prefix_k {_shape(prefix_k)} and prefix_v {_shape(prefix_v)}")
    kb, heads_kv, len_k, kd = k.shape
    if kb != batch:
        raise ValueError(f"k must be [batch={batch}, heads_kv, len_k, head_dim] like q, got shape {_shape(k)}")
    if kd != head_dim:
        raise ValueError(f"k must be [batch, heads_kv, len_k, head_dim={head_dim}] like q, got shape {_shape(k)}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"heads_q={heads_q} (q.shape[1]) must be a multiple of heads_kv={heads_kv} "
                         f"(k.shape[1]) for grouped-query attention")
    if len_q > len_k:
        raise ValueError(f"len_q={len_q} (q.shape[2]) must be <= len_k={len_k} (k.shape[2]): queries are "
                         f"the last len_q text positions")
    if head_dim == 0:
        raise ValueError("head_dim (q.shape[3]) must be >= 1")
    if prefix_k.shape[-3] != heads_kv or prefix_k.shape[-1] != head_dim:
        lead = "num_entries, " if bank else ""
        raise ValueError(f"prefix_k must be [{lead}heads_kv={heads_kv}, num_prefix, head_dim={head_dim}], "
                         f"got shape {_shape(prefix_k)}")
    if bank:
        entries = prefix_k.shape[0]
        for name, t, shape in (("prefix_ids", prefix_ids, f"[batch={batch}]"),
                               ("prefix_lengths", prefix_lengths, f"[num_entries={entries}]")):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be an integer torch.Tensor {shape}, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be an int32 or int64 tensor {shape}, got dtype {t.dtype}")
            want = batch if name == "prefix_ids" else entries
            if tuple(t.shape) != (want,):
                raise ValueError(f"{name} must be {shape}, got shape {_shape(t)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in named:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all of q, k, v, prefix_k, "
                            f"prefix_v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share a device")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or 0/1 integers [batch={batch}, len_k={len_k}], "
                            f"got dtype {attention_mask.dtype} (additive float masks are not accepted)")
        if tuple(attention_mask.shape) != (batch, len_k):
            raise ValueError(f"attention_mask must be [batch={batch}, len_k={len_k}] (1 = text key visible), "
                             f"got shape {_shape(attention_mask)}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0 = no capping), got {type(softcap).__name__}")
    if not (softcap >= 0 and softcap < float("inf")):
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = no capping), got {softcap}")


def _check_bank_values(prefix_k, prefix_ids, prefix_lengths) -> None:
    """Values of prefix_ids (in [0, num_entries)) and prefix_lengths (in [0, num_prefix]); one host sync each."""
    if prefix_ids is None:
        return
    entries, num_prefix = prefix_k.shape[0], prefix_k.shape[2]
    if prefix_ids.numel():
        lo, hi = int(prefix_ids.min()), int(prefix_ids.max())
        if lo < 0 or hi >= entries:
            raise ValueError(f"prefix_ids must be in [0, num_entries={entries}) (prefix_k.shape[0]), got values "
                             f"from {lo} to {hi}")
    if prefix_lengths is not None and prefix_lengths.numel():
        lo, hi = int(prefix_lengths.min()), int(prefix_lengths.max())
        if lo < 0 or hi > num_prefix:
            raise ValueError(f"prefix_lengths must be in [0, num_prefix={num_prefix}] (prefix_k.shape[2]), got "
                             f"values from {lo} to {hi}")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status():
    """(module or None, reason)."""
    try:
        from . import triton as triton_backend  # noqa: PLC0415 - lazy: importing triton is slow
    except Exception as exc:  # ImportError, or a broken Triton install
        return None, f"Triton could not be imported: {type(exc).__name__}: {exc}"
    return triton_backend, "ok"


@functools.lru_cache(maxsize=None)
def _cpu_status():
    """(module or None, reason): the native C++ extension, built by setup.py or JIT-compiled on first use."""
    try:
        from . import cpu as cpu_backend  # noqa: PLC0415
    except ImportError as exc:
        return None, f"no native CPU backend module: {exc}"
    ok, reason = cpu_backend.is_available()
    return (cpu_backend if ok else None), reason


def available_backends() -> dict:
    """{backend: reason}, "ok" when usable on this machine (the Triton entry says whether a GPU is there)."""
    tri, tri_reason = _triton_status()
    if tri is not None and not torch.cuda.is_available():
        tri_reason = ("ok (interpreter: TRITON_INTERPRET=1)" if _triton_interpreting()
                      else "importable, but no CUDA GPU (set TRITON_INTERPRET=1 to run it on the CPU)")
    _, cpu_reason = _cpu_status()
    return {"triton": tri_reason, "cpu": cpu_reason, "torch": "ok"}


_warned_fallback = False


def _pick_backend(q: torch.Tensor, backend: Optional[str]) -> str:
    return _resolve_backend(q.device.type, backend)


# Run eagerly, never traced: under torch.compile the choice is made once at trace time and baked in.
@torch.compiler.assume_constant_result
def _resolve_backend(device_type: str, backend: Optional[str]) -> str:
    global _warned_fallback
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend is None:
        if device_type == "cuda":
            return "triton"
        if device_type != "cpu":
            raise ValueError(f"prefix_attention supports CUDA and CPU tensors, got device {device_type}; "
                             f"pass backend='torch' to run the reference on it")
        mod, reason = _cpu_status()
        if mod is not None:
            return "cpu"
        if not _warned_fallback:
            warnings.warn(f"prefix_attn: native CPU kernel unavailable ({reason}); using the PyTorch "
                          f"reference for CPU tensors", RuntimeWarning, stacklevel=3)
            _warned_fallback = True
        return "torch"
    if backend == "triton":
        mod, reason = _triton_status()
        if mod is None:
            raise RuntimeError(f"backend='triton' requested but {reason}")
        if device_type != "cuda" and not (device_type == "cpu" and _triton_interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device_type}); on the CPU set "
                             f"TRITON_INTERPRET=1 before importing triton to run the kernels interpreted")
    elif backend == "cpu":
        if device_type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device_type}")
        mod, reason = _cpu_status()
        if mod is None:
            raise RuntimeError(f"backend='cpu' requested but the native CPU kernel is unavailable: {reason}")
    return backend


def _backend_module(name: str):
    return (_triton_status if name == "triton" else _cpu_status)()[0]


# The launchers as torch.library custom ops: opaque to torch.compile (no graph break, shapes from the fake
# implementations below), and the same code path in eager mode.
@torch.library.custom_op("prefix_attn::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
            attention_mask: Optional[torch.Tensor], prefix_ids: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], causal: bool, softmax_scale: float, softcap: float,
            dropout_p: float, dropout_seed: Optional[torch.Tensor], backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_bank_values(prefix_k, prefix_ids, prefix_lengths)
    return _backend_module(backend).prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal,
                                                    softmax_scale, softcap, prefix_ids=prefix_ids,
                                                    prefix_lengths=prefix_lengths, dropout_p=dropout_p,
                                                    dropout_seed=dropout_seed)


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, causal, softmax_scale, softcap,
      dropout_p, dropout_seed, backend):
    # the CPU kernel keeps lse in float64 for float64 inputs (gradcheck precision); float32 everywhere else
    lse_dtype = torch.float64 if (q.dtype == torch.float64 and backend == "cpu") else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("prefix_attn::bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
            prefix_v: torch.Tensor, attention_mask: Optional[torch.Tensor], prefix_ids: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool,
            softmax_scale: float, softcap: float, dropout_p: float, dropout_seed: Optional[torch.Tensor], backend: str,
            need_dq: bool, need_dkv: bool,
            need_dprefix: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backend_module(backend).prefix_attn_bwd(
        dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap,
        need_dq=need_dq, need_dkv=need_dkv, need_dprefix=need_dprefix, prefix_ids=prefix_ids,
        prefix_lengths=prefix_lengths, dropout_p=dropout_p, dropout_seed=dropout_seed)
    return _op_grads(q, grads)


def _op_grads(q, grads):
    """Custom ops return tensors, never None: an unneeded gradient comes back as an empty tensor."""
    return tuple(q.new_empty(0) if g is None else g for g in grads)


def _fake_grads(q, k, v, prefix_k, prefix_v, need_dq, need_dkv, need_dprefix):
    """What a backward custom op returns, for its fake (shape-only) implementation."""
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else q.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv), like(prefix_k, need_dprefix),
            like(prefix_v, need_dprefix))


def _input_grads(needs, grads, num_other_inputs: int):
    """autograd's return of the five tensor gradients (None where not needed), then None for the other inputs."""
    return tuple(g if need else None for g, need in zip(grads, needs[:5])) + (None,) * num_other_inputs


@_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, out, lse, causal,
      softmax_scale, softcap, dropout_p, dropout_seed, backend, need_dq, need_dkv, need_dprefix):
    return _fake_grads(q, k, v, prefix_k, prefix_v, need_dq, need_dkv, need_dprefix)


class PrefixAttentionFunction(torch.autograd.Function):
    """Fused prefix attention with a fused backward. Not for direct use: call ``prefix_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, causal, softmax_scale,
                softcap, dropout_p, dropout_seed, backend):
        out, lse = _fwd_op(q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, causal,
                           softmax_scale, softcap, dropout_p, dropout_seed, backend)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, attention_mask, prefix_ids, prefix_lengths,
                              dropout_seed)
        ctx.causal, ctx.softmax_scale, ctx.softcap, ctx.backend = causal, softmax_scale, softcap, backend
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, out, lse, attention_mask, prefix_ids, prefix_lengths, seed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _bwd_op(
            dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_ids, prefix_lengths, out, lse, ctx.causal,
            ctx.softmax_scale, ctx.softcap, ctx.dropout_p, seed, ctx.backend, needs[0], needs[1] or needs[2],
            needs[3] or needs[4],
        )
        return _input_grads(needs, grads, 9)


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
        k, v:           ``[batch, heads_kv, len_k, head_dim]``; ``heads_q % heads_kv == 0``; ``len_q <= len_k``
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
        backend:        None (CUDA -> "triton", CPU -> "cpu" if built else "torch"), or force one of those

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
    if isinstance(q, torch.Tensor):
        (q, k, v, prefix_k, prefix_v), autocast = _autocast_inputs(q, k, v, prefix_k, prefix_v)
        if autocast:  # the kernels run in the cast dtype; nothing inside is re-cast by autocast
            with torch.autocast(q.device.type, enabled=False):
                return prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale,
                                        attention_mask=attention_mask, softcap=softcap, prefix_ids=prefix_ids,
                                        prefix_lengths=prefix_lengths, dropout_p=dropout_p,
                                        dropout_seed=dropout_seed, backend=backend)
    _check_inputs(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap, prefix_ids, prefix_lengths)
    dropout_p, seed = _dropout.prepare(dropout_p, dropout_seed, q.device)
    backend = _pick_backend(q, backend)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    if backend == "torch" or q.shape[2] == 0:
        if not torch.compiler.is_compiling():
            _check_bank_values(prefix_k, prefix_ids, prefix_lengths)
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=bool(causal), softmax_scale=scale,
                                          attention_mask=mask, softcap=float(softcap), prefix_ids=prefix_ids,
                                          prefix_lengths=prefix_lengths, dropout_p=dropout_p,
                                          dropout_seed=None if seed is None else int(seed))
    if backend == "triton":
        if head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"head_dim={head_dim} (q.shape[3]) is above the Triton kernels' limit of "
                             f"{TRITON_MAX_HEAD_DIM}")
        if q.dtype == torch.float64 and q.is_cuda:
            raise TypeError("the Triton kernels take float16, bfloat16 or float32 on the GPU, got float64")
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, mask, prefix_ids, prefix_lengths,
                                         bool(causal), scale, float(softcap), dropout_p, seed, backend)
