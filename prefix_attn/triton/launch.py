"""Launchers for the Triton prefix-attention kernels: allocate outputs, pick block sizes and grids.

    prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap, **extras)
        -> (out, lse)
    prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap,
                    need_dq, need_dkv, need_dprefix, **extras) -> (dq, dk, dv, dprefix_k, dprefix_v)

extras: prefix_ids / prefix_lengths (a bank), cu_seqlens_q / cu_seqlens_k / max_seqlen_q / max_seqlen_k (packed
sequences), dropout_p / dropout_seed (attention dropout, seed an int64 0-d tensor on q's device).

Shapes as in ``prefix_attention`` / ``prefix_attention_varlen``. Inputs are read through their strides (no
copies); outputs are allocated contiguous. ``lse`` is float32 [B, Hq, Tq] (packed [Hq, total_q]), natural log,
+inf for a query that sees no key.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch

from .. import checks, dropout
from . import kernels, kernels_bwd, tuning
from .fastlaunch import FastKernel
from .kernels import LOG2E

# every launch goes through fastlaunch: Triton's JIT on a specialisation's first launch, then its compiled kernel
# called directly (~50 us of host time less a launch; PREFIX_ATTN_FAST_LAUNCH=0 turns it off)
_prefix_attn_fwd_kernel = FastKernel(kernels._prefix_attn_fwd_kernel)
_prefix_attn_bwd_preprocess_kernel = FastKernel(kernels._prefix_attn_bwd_preprocess_kernel)
_prefix_attn_bwd_dkdv_kernel = FastKernel(kernels_bwd._prefix_attn_bwd_dkdv_kernel)
_prefix_attn_bwd_dprefix_kernel = FastKernel(kernels_bwd._prefix_attn_bwd_dprefix_kernel)
_prefix_attn_bwd_dq_kernel = FastKernel(kernels_bwd._prefix_attn_bwd_dq_kernel)
_prefix_attn_reduce_kernel = FastKernel(kernels_bwd._prefix_attn_reduce_kernel)

MAX_GRID_Y = 65535  # CUDA's limit on grid.y, which carries batch * heads
PREFIX_BLOCK_MAX = 64  # prefix tiles of the dprefix kernel: max(16, next_pow2(P)) up to this
MIN_UNITS_PER_SPLIT = 8  # query blocks per split of the prefix reduction, at least


def _interpreting() -> bool:
    return tuning.interpreting()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr_function in Triton 3.9: ~3 us of host time a call


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots; Triton's default for a float32 dot is tf32 (~3e-4 rel. error)
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"  # see kernels._dot: the interpreter's bfloat16 dot is broken
    return "tf32"  # ignored for 16-bit operands


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_DUMMIES = {}


def _dummy(t: torch.Tensor) -> torch.Tensor:
    """The pointer argument of a switched-off input (no mask, ids, lengths, cu_seqlens, seed): one empty int32
    tensor per device, never read (the kernels read them only under their constexpr switch). Passing q instead
    repeated q's dtype and alignment in those arguments' launch keys. Empty: it owns no memory (a null pointer,
    16-byte aligned for Triton's key; the CUDA launcher passes it through), so one first made while a CUDA graph
    is captured (torch.compile's "reduce-overhead") holds nothing of the graph's memory pool."""
    key = t.is_cuda, t.get_device()  # (False, -1) on the CPU; cheaper than t.device
    try:
        return _DUMMIES[key]
    except KeyError:
        dummy = _DUMMIES[key] = torch.empty(0, dtype=torch.int32, device=t.device)
        return dummy


def _mask_args(attention_mask: Optional[torch.Tensor], fallback: torch.Tensor):
    if attention_mask is None:
        return _dummy(fallback), (0, 0), False
    mask = attention_mask if attention_mask.dtype == torch.uint8 else attention_mask.to(torch.bool).view(torch.uint8)
    return mask, tuple(mask.stride()), True


def _check_grid(batch: int, heads: int) -> None:
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"batch * heads = {batch * heads} exceeds the Triton kernels' limit of {MAX_GRID_Y}; "
                         f"split the batch")


_NO_SWITCH = contextlib.nullcontext()
_CONTIGUOUS = torch.contiguous_format  # outputs: torch.empty_like(t, memory_format=_CONTIGUOUS), a third of the
# host time of torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it q's (models sharded over several GPUs). Entering
    ``torch.cuda.device`` costs a few us of host time a call, so only when q is on another device."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(t.device)


def prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal: bool, softmax_scale: float,
                    softcap: float = 0.0, prefix_ids=None, prefix_lengths=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0, dropout_p: float = 0.0,
                    dropout_seed=None):
    """Padded ([B, H, T, D]) or, with cu_seqlens_q/k, packed ([total, H, D]) inputs; lse [B, Hq, Tq] or
    [Hq, total_q]. dropout_seed: int64 0-d tensor on q's device, needed when dropout_p > 0."""
    q, softmax_scale, _ = positive_scale(q, softmax_scale)
    with _on_device(q):
        bank = _Bank(prefix_k, prefix_v, prefix_ids, prefix_lengths, q)
        layout = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        drop = _Dropout(dropout_p, dropout_seed, q)
        return _fwd(q, k, v, bank, layout, drop, attention_mask, causal, softmax_scale, softcap)


def prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal: bool,
                    softmax_scale: float, softcap: float = 0.0, need_dq: bool = True, need_dkv: bool = True,
                    need_dprefix: bool = True, prefix_ids=None, prefix_lengths=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0, dropout_p: float = 0.0,
                    dropout_seed=None):
    q, softmax_scale, dq_factor = positive_scale(q, softmax_scale)
    with _on_device(q):
        bank = _Bank(prefix_k, prefix_v, prefix_ids, prefix_lengths, q)
        layout = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        drop = _Dropout(dropout_p, dropout_seed, q)
        grads = _bwd(dout, q, k, v, bank, layout, drop, attention_mask, out, lse, causal, softmax_scale, softcap,
                     need_dq, need_dkv, need_dprefix)
    if dq_factor != 1.0 and grads[0] is not None:  # the gradient of q * dq_factor
        grads[0].mul_(dq_factor)
    return grads


def positive_scale(q, softmax_scale: float):
    """(q, softmax_scale, dq_factor) as the kernels need them: softmax_scale > 0, and the factor that turns the
    kernels' dQ into the gradient of the caller's q. They take a running max over the raw q.k
    products and scale it afterwards, and mask with -inf before scaling (-inf * 0 is NaN, -inf * -1 is +inf).
    A negative scale: (-q, -softmax_scale), exact: negation is exact and round-to-nearest symmetric, so every score
    scale * q.k is the same bits and so is dK = scale * dS^T q (dQ comes back negated: the caller negates it).
    A zero scale: (q * 0, 1.0): every score is 0 as 0 * q.k is (NaN where q or k is not finite, as there), dK = 0
    (the caller multiplies dQ by 0)."""
    if softmax_scale < 0:
        return -q, -softmax_scale, -1.0
    if softmax_scale == 0:
        return q * 0.0, 1.0, 0.0
    return q, softmax_scale, 1.0


class _Layout:
    """Padded [B, H, T, D] tensors, or packed [total, H, D] ones with cu_seqlens (VARLEN): batch rows (or
    sequences), the lengths the grid covers, per-tensor (batch, head, row, dim) strides and the LSE layout."""

    def __init__(self, q, k, cu_q, cu_k, max_q, max_k):
        self.varlen = cu_q is not None
        if self.varlen:
            self.batch, self.len_q, self.len_k = cu_q.numel() - 1, int(max_q), int(max_k)
            self.heads_q, self.head_dim, self.heads_kv = q.shape[1], q.shape[2], k.shape[1]
            self.total_q = q.shape[0]
            self.cu_q = cu_q.to(torch.int32).contiguous()
            self.cu_k = cu_k.to(torch.int32).contiguous()
        else:
            self.batch, self.heads_q, self.len_q, self.head_dim = q.shape
            self.heads_kv, self.len_k = k.shape[1], k.shape[2]
            self.cu_q = self.cu_k = _dummy(q)

    def s(self, t):
        return (0, t.stride(1), t.stride(0), t.stride(2)) if self.varlen else tuple(t.stride())

    def lse_empty(self, device):
        shape = (self.heads_q, self.total_q) if self.varlen else (self.batch, self.heads_q, self.len_q)
        return torch.empty(shape, dtype=torch.float32, device=device)

    def lse_strides(self):
        return (0, self.total_q) if self.varlen else (self.heads_q * self.len_q, self.len_q)

    def rows(self):
        """(batch, rows per head) of the [B, H, rows, D] view the row-wise delta kernel walks."""
        return (1, self.total_q) if self.varlen else (self.batch, self.len_q)


class _Bank:
    """The prefix as the kernels see it: ``k`` / ``v`` a bank [N, Hkv, P, D], or a shared prefix [Hkv, P, D] read as
    the bank's one entry (``strides()`` gives it an entry stride of 0), and the per-row descriptor tensors (int32 ids
    [B], lengths [N]), with dummies where a switch is off."""

    def __init__(self, prefix_k, prefix_v, prefix_ids, prefix_lengths, q):
        self.shared = prefix_ids is None
        self.prefix_k, self.prefix_v = self.k, self.v = prefix_k, prefix_v
        self.entries = 1 if self.shared else prefix_k.shape[0]
        self.num_prefix = prefix_k.shape[-2]
        # the same ids / lengths tensors in every layer of a forward: converted (and grouped) once
        self.ids = None if self.shared else checks.memo(prefix_ids, "int32", lambda: _int32(prefix_ids))
        self.lengths = (None if prefix_lengths is None
                        else checks.memo(prefix_lengths, "int32", lambda: _int32(prefix_lengths)))
        self.source_ids = prefix_ids
        self.ids_arg = _dummy(q) if self.ids is None else self.ids
        self.lengths_arg = _dummy(q) if self.lengths is None else self.lengths

    def strides(self):
        """(entry, head, row, dim) strides of k, then of v; a shared prefix is the one entry (stride 0)."""
        if self.shared:
            return (0, *self.k.stride(), 0, *self.v.stride())
        return (*self.k.stride(), *self.v.stride())

    def flags(self):
        return dict(HAS_IDS=not self.shared, HAS_LENS=self.lengths is not None)

    def used_entries(self):
        """(entry [U], row_start [U], row_count [U], rows [B], the largest count): int32 tensors of the entries
        some row chose, ascending, and the batch rows grouped by entry (stable, so each entry's rows stay in batch
        order). One host read per ids tensor (memoised), not one per layer."""
        return checks.memo(self.source_ids, "used_entries", lambda: checks.group_rows(self.ids))


def _int32(t):
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


class _Dropout:
    """Dropout as the kernels see it: the seed tensor (a dummy when off), the 16-bit keep threshold, the scale of
    kept probabilities and the DROPOUT switch (off for p = 0: the plain kernels)."""

    def __init__(self, dropout_p: float, dropout_seed, q):
        self.on = dropout_p > 0
        if self.on and not (isinstance(dropout_seed, torch.Tensor) and dropout_seed.dtype == torch.int64
                            and dropout_seed.numel() == 1 and dropout_seed.device == q.device):
            raise ValueError(f"dropout_p > 0 needs dropout_seed as an int64 one-element tensor on {q.device}")
        self.seed = dropout_seed if self.on else _dummy(q)
        self.threshold = dropout.threshold(dropout_p) if self.on else 0
        self.scale = 1.0 / (1.0 - dropout_p) if self.on else 1.0

    def args(self):
        return self.threshold, self.scale


def _softcap_args(softmax_scale: float, softcap: float):
    """(cap_in, cap_out, SOFTCAP) kernel arguments; softcap 0 compiles the plain path."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E, True
    return 0.0, 0.0, False


def _fwd(q, k, v, bank: _Bank, lay: _Layout, drop: _Dropout, attention_mask, causal: bool, softmax_scale: float,
         softcap: float):
    batch, heads_q, len_q, head_dim = lay.batch, lay.heads_q, lay.len_q, lay.head_dim
    heads_kv, len_k = lay.heads_kv, lay.len_k
    num_prefix = bank.num_prefix
    _check_grid(batch, heads_q)
    out = torch.empty_like(q, memory_format=_CONTIGUOUS)
    lse = lay.lse_empty(q.device)
    if out.numel() == 0 or batch == 0 or len_q == 0:
        return out, lse.fill_(float("inf"))
    mask, mask_strides, has_mask = _mask_args(attention_mask, q)
    cap_in, cap_out, has_cap = _softcap_args(softmax_scale, softcap)

    def run(cfg: tuning.Blocks):
        grid = (_cdiv(len_q, cfg.block_m), batch * heads_q)
        _prefix_attn_fwd_kernel.run(grid,
            q, k, v, bank.k, bank.v, mask, bank.ids_arg, bank.lengths_arg, lay.cu_q, lay.cu_k, drop.seed, out, lse,
            *lay.s(q), *lay.s(k), *lay.s(v), *bank.strides(), *mask_strides, *lay.s(out), *lay.lse_strides(),
            heads_q, heads_q // heads_kv, len_q, len_k, num_prefix, softmax_scale * LOG2E, cap_in, cap_out,
            *drop.args(),
            CAUSAL=bool(causal), HAS_MASK=has_mask, PRECISION=_precision(q.dtype), SOFTCAP=has_cap, **bank.flags(),
            VARLEN=lay.varlen, DROPOUT=drop.on,
            HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=tuning.block_d(head_dim),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    dims = (len_q, len_k, num_prefix, bool(causal), has_mask, has_cap) + ((True,) if drop.on else ())
    run(tuning.config("fwd", q.dtype, head_dim, dims, q.device, run))
    return out, lse


def _prefix_splits(units: int, programs_per_split: int, device: torch.device, sms: int = 0) -> int:
    """How many ways to split the batch-wide reduction for the prefix gradient: enough programs to fill
    the GPU (about 4 per SM; ``sms`` if given, else the device's), but at least MIN_UNITS_PER_SPLIT query blocks
    per split."""
    if device.type == "cuda" and not sms:
        sms = _num_sms(device.index or 0)
    target = 4 * sms if device.type == "cuda" else 4 * programs_per_split
    splits = math.ceil(target / max(1, programs_per_split))
    return max(1, min(splits, units // MIN_UNITS_PER_SPLIT))


@functools.lru_cache(maxsize=1024)
def _dprefix_plan(max_rows: int, group: int, len_q: int, num_prefix: int, heads_kv: int, used: int, block_m: int,
                  block_n: int, sms: int):
    """(units of the busiest entry, prefix pieces, units per split, splits) of the prefix-gradient launches, from
    shapes only (memoised: the same in every layer). ``sms``: the device's SM count, 0 off CUDA."""
    units = max_rows * group * _cdiv(len_q, block_m)
    pieces = tuple(_prefix_pieces(num_prefix, min(block_n, PREFIX_BLOCK_MAX)))
    programs = sum(n for _, _, n in pieces) * heads_kv * used
    device = torch.device("cuda") if sms else torch.device("cpu")
    per_split = _cdiv(units, _prefix_splits(units, programs, device, sms))
    return units, pieces, per_split, _cdiv(units, per_split)


def _dprefix_warps(cfg: tuning.Blocks, block_n: int) -> int:
    """Warps of the prefix-gradient kernel: one warpgroup (4 warps) for a prefix tile of at most 64 rows. Eight
    warps on a 64-row tile make both warpgroups compute the same S and dP (36 HGMMA per step where 20 are needed,
    sm_90 compile report in benchmarks/TUNING.md)."""
    return cfg.num_warps if block_n > 64 else min(cfg.num_warps, 4)


def _prefix_pieces(num_prefix: int, block_max: int):
    """[(start, block_n, n_blocks)]: prefix tiles of max(16, next_pow2(P)) rows up to block_max, and a tail
    rounded up to 16 rows, split into power-of-two tiles (P = 200 with 64-row tiles: 3 x 64 + 1 x 16)."""
    block = min(block_max, tuning.block_d(num_prefix))
    full = num_prefix // block
    pieces = [(0, block, full)] if full else []
    start, tail = full * block, -(-(num_prefix - full * block) // 16) * 16
    while tail > 0:
        piece = 1 << (tail.bit_length() - 1)
        pieces.append((start, piece, 1))
        start, tail = start + piece, tail - piece
    return pieces


def _bwd(dout, q, k, v, bank: _Bank, lay: _Layout, drop: _Dropout, attention_mask, out, lse, causal, softmax_scale,
         softcap, need_dq, need_dkv, need_dprefix):
    prefix_k, prefix_v = bank.prefix_k, bank.prefix_v
    batch, heads_q, len_q, head_dim = lay.batch, lay.heads_q, lay.len_q, lay.head_dim
    heads_kv, len_k = lay.heads_kv, lay.len_k
    num_prefix = bank.num_prefix
    group = heads_q // heads_kv
    _check_grid(batch, heads_q)
    if q.numel() == 0 or batch == 0 or len_q == 0:  # nothing to propagate: every gradient is zeros
        return tuple(torch.zeros_like(t) if need else None for t, need in
                     ((q, need_dq), (k, need_dkv), (v, need_dkv), (prefix_k, need_dprefix), (prefix_v, need_dprefix)))
    dq = torch.empty_like(q, memory_format=_CONTIGUOUS) if need_dq else None
    dk = torch.empty_like(k, memory_format=_CONTIGUOUS) if need_dkv else None
    dv = torch.empty_like(v, memory_format=_CONTIGUOUS) if need_dkv else None
    dpk = dpv = None
    if need_dprefix:  # written whole by the reduction; zeros where P = 0 (and, in a bank, for unused entries)
        make = torch.empty_like if num_prefix > 0 and bank.shared else torch.zeros_like
        dpk = make(prefix_k, memory_format=_CONTIGUOUS)
        dpv = make(prefix_v, memory_format=_CONTIGUOUS)
    mask, mask_strides, has_mask = _mask_args(attention_mask, q)
    bd = tuning.block_d(head_dim)
    precision = _precision(q.dtype)
    qk_scale = softmax_scale * LOG2E
    cap_in, cap_out, has_cap = _softcap_args(softmax_scale, softcap)
    dims = (len_q, len_k, num_prefix, bool(causal), has_mask, has_cap, group) + ((True,) if drop.on else ())
    flags = dict(PRECISION=precision, SOFTCAP=has_cap, HEAD_DIM=head_dim, BLOCK_D=bd, VARLEN=lay.varlen,
                 DROPOUT=drop.on)
    s_q, s_k, s_v, s_dout, s_bank = lay.s(q), lay.s(k), lay.s(v), lay.s(dout), bank.strides()
    lse = lse if lse.is_contiguous() else lse.contiguous()  # an aten call even when it is a no-op

    delta = torch.empty_like(lse)
    pre_m = 64 if not _interpreting() else 16
    pre_batch, pre_rows = lay.rows()  # packed: one "row" of total_q queries
    _prefix_attn_bwd_preprocess_kernel.run((_cdiv(pre_rows, pre_m), pre_batch * heads_q),
        out, dout, delta, *lay.s(out), *s_dout, heads_q, pre_rows,
        HEAD_DIM=head_dim, BLOCK_M=pre_m, BLOCK_D=bd,
    )
    lse_strides = lay.lse_strides()

    if need_dkv:
        def run_dkdv(cfg: tuning.Blocks):
            _prefix_attn_bwd_dkdv_kernel.run((_cdiv(len_k, cfg.block_n), batch * heads_kv),
                q, k, v, dout, lse, delta, mask, lay.cu_q, lay.cu_k, drop.seed, dk, dv,
                *s_q, *s_k, *s_v, *s_dout, *mask_strides, *lay.s(dk), *lse_strides,
                heads_q, heads_kv, group, len_q, len_k, num_prefix, qk_scale, softmax_scale, cap_in, cap_out,
                *drop.args(),
                CAUSAL=bool(causal), HAS_MASK=has_mask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
            )

        run_dkdv(tuning.config("dkdv", q.dtype, head_dim, dims, q.device, run_dkdv))
    if need_dprefix and num_prefix > 0:
        if bank.shared:
            entry = start_row = count = rows = _dummy(q)  # one entry, every row
            used, max_rows = 1, batch
        else:
            entry, start_row, count, rows, max_rows = bank.used_entries()
            used = entry.numel()

        def run_dprefix(cfg: tuning.Blocks):
            sms = _num_sms(q.device.index or 0) if q.is_cuda else 0
            units, pieces, per_split, splits = _dprefix_plan(max_rows, group, len_q, num_prefix, heads_kv, used,
                                                             cfg.block_m, cfg.block_n, sms)
            per_entry = heads_kv * num_prefix * head_dim
            numel = used * per_entry
            split_stride = -(-numel // 16) * 16  # rows of the partials 64-byte aligned: vector loads in the reduction
            partial_k = torch.empty((splits, split_stride), dtype=torch.float32, device=q.device)
            partial_v = torch.empty_like(partial_k)
            for start, block_n, n_blocks in pieces:
                _prefix_attn_bwd_dprefix_kernel.run((n_blocks, heads_kv, used * splits),
                    q, bank.k, bank.v, dout, lse, delta, rows, start_row, count, entry, bank.lengths_arg,
                    lay.cu_q, drop.seed, partial_k, partial_v,
                    *s_q, *s_bank, *s_dout, *lse_strides,
                    heads_q, heads_kv, group, len_q, num_prefix, start, qk_scale, softmax_scale,
                    cap_in, cap_out, *drop.args(), units, per_split, splits, split_stride,
                    BLOCK_M=cfg.block_m, BLOCK_N=block_n, num_warps=_dprefix_warps(cfg, block_n),
                    num_stages=cfg.num_stages, **bank.flags(), **flags,
                )
            # one launch sums the splits in a fixed order and casts both gradients: bitwise reproducible
            reduce_block = 1024 if not _interpreting() else 256
            _prefix_attn_reduce_kernel.run((_cdiv(numel, reduce_block),),
                partial_k, partial_v, dpk, dpv, entry, splits, split_stride, numel, per_entry, HAS_IDS=not bank.shared,
                BLOCK=reduce_block,
            )

        run_dprefix(tuning.config("dprefix", q.dtype, head_dim, dims + (batch,), q.device, run_dprefix))
    if need_dq:
        def run_dq(cfg: tuning.Blocks):
            _prefix_attn_bwd_dq_kernel.run((_cdiv(len_q, cfg.block_m), batch * heads_q),
                q, k, v, bank.k, bank.v, dout, lse, delta, mask, bank.ids_arg, bank.lengths_arg, lay.cu_q, lay.cu_k,
                drop.seed, dq, *s_q, *s_k, *s_v, *s_bank, *s_dout, *mask_strides,
                *lay.s(dq), *lse_strides,
                heads_q, group, len_q, len_k, num_prefix, qk_scale, softmax_scale, cap_in, cap_out, *drop.args(),
                CAUSAL=bool(causal), HAS_MASK=has_mask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **bank.flags(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
            )

        run_dq(tuning.config("dq", q.dtype, head_dim, dims, q.device, run_dq))
    return dq, dk, dv, dpk, dpv
