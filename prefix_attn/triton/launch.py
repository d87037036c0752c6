"""Launchers for the Triton prefix-attention kernels: allocate outputs, pick block sizes and grids.

    prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap) -> (out, lse)
    prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap,
                    need_dq, need_dkv, need_dprefix) -> (dq, dk, dv, dprefix_k, dprefix_v)

Shapes as in ``prefix_attn.reference``. Inputs are read through their strides (no copies); outputs are
allocated contiguous. ``lse`` is float32 [B, Hq, Tq], natural log, +inf for a query that sees no key.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton

from .kernels import (
    LOG2E,
    _prefix_attn_bwd_dkdv_kernel,
    _prefix_attn_bwd_dprefix_kernel,
    _prefix_attn_bwd_dq_kernel,
    _prefix_attn_bwd_preprocess_kernel,
    _prefix_attn_fwd_kernel,
)

MAX_GRID_Y = 65535  # CUDA's limit on grid.y, which carries batch * heads


class _Blocks(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16; pad D, mask the tail


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots; Triton's default for a float32 dot is tf32 (~3e-4 rel. error)
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"  # see kernels._dot: the interpreter's bfloat16 dot is broken
    return "tf32"  # ignored for 16-bit operands


def _fwd_blocks(block_d: int, dtype: torch.dtype) -> _Blocks:
    if _interpreting():
        return _Blocks(16, 16, 4, 1)  # small tiles: the CPU interpreter walks every block, odd shapes hit edges
    if dtype in (torch.float32, torch.float64):
        # ieee float32 dots run on FMA with both operands in registers: larger tiles spilled several KB per
        # thread when compiled for sm_90 (ptxas report), so float32 keeps small tiles
        if block_d <= 64:
            return _Blocks(32, 32, 4, 1)
        return _Blocks(16, 32, 4, 1) if block_d <= 128 else _Blocks(16, 16, 4, 1)
    if block_d <= 64:
        return _Blocks(128, 64, 4, 3)
    if block_d <= 128:
        return _Blocks(128, 64, 8, 3)
    return _Blocks(64, 32, 4, 2)


def _bwd_blocks(block_d: int, dtype: torch.dtype) -> _Blocks:
    """(BLOCK_M, BLOCK_N) for the dK/dV kernels; the dQ kernel uses them swapped."""
    if _interpreting():
        return _Blocks(16, 16, 4, 1)
    if dtype in (torch.float32, torch.float64):
        return _Blocks(16, 32, 4, 1) if block_d <= 64 else _Blocks(16, 16, 4, 1)
    if block_d <= 64:
        return _Blocks(32, 64, 4, 2)
    if block_d <= 128:
        return _Blocks(32, 64, 8, 2)
    return _Blocks(16, 32, 4, 1)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _mask_args(attention_mask: Optional[torch.Tensor], fallback: torch.Tensor):
    if attention_mask is None:
        return fallback, (0, 0), False
    mask = attention_mask if attention_mask.dtype == torch.uint8 else attention_mask.to(torch.bool).view(torch.uint8)
    return mask, tuple(mask.stride()), True


def _check_grid(batch: int, heads: int) -> None:
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"batch * heads = {batch * heads} exceeds the Triton kernels' limit of {MAX_GRID_Y}; "
                         f"split the batch")


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it q's (models sharded over several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal: bool, softmax_scale: float,
                    softcap: float = 0.0):
    with _on_device(q):
        return _fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap)


def prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal: bool,
                    softmax_scale: float, softcap: float = 0.0, need_dq: bool = True, need_dkv: bool = True,
                    need_dprefix: bool = True):
    with _on_device(q):
        return _bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap,
                    need_dq, need_dkv, need_dprefix)


def _softcap_args(softmax_scale: float, softcap: float):
    """(cap_in, cap_out, SOFTCAP) kernel arguments; softcap 0 compiles the plain path."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E, True
    return 0.0, 0.0, False


def _fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal: bool, softmax_scale: float, softcap: float):
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    num_prefix = prefix_k.shape[1]
    _check_grid(batch, heads_q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=q.device)
    mask, mask_strides, has_mask = _mask_args(attention_mask, q)
    block_d = _block_d(head_dim)
    cfg = _fwd_blocks(block_d, q.dtype)
    cap_in, cap_out, has_cap = _softcap_args(softmax_scale, softcap)
    grid = (triton.cdiv(len_q, cfg.block_m), batch * heads_q)
    _prefix_attn_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *mask_strides,
        *out.stride(),
        heads_q, heads_q // heads_kv, len_q, len_k, num_prefix, head_dim, softmax_scale * LOG2E, cap_in, cap_out,
        CAUSAL=bool(causal), HAS_MASK=has_mask, PRECISION=_precision(q.dtype), SOFTCAP=has_cap,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _prefix_splits(units: int, programs_per_split: int, device: torch.device) -> int:
    """How many ways to split the batch-wide reduction for the prefix gradient: enough programs to fill
    the GPU (about 4 per SM), never more splits than query blocks."""
    target = 4 * _num_sms(device.index or 0) if device.type == "cuda" else 4 * programs_per_split
    return max(1, min(units, math.ceil(target / max(1, programs_per_split))))


def _bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap, need_dq,
         need_dkv, need_dprefix):
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    num_prefix = prefix_k.shape[1]
    group = heads_q // heads_kv
    _check_grid(batch, heads_q)
    mask, mask_strides, has_mask = _mask_args(attention_mask, q)
    block_d = _block_d(head_dim)
    cfg = _bwd_blocks(block_d, q.dtype)
    precision = _precision(q.dtype)
    qk_scale = softmax_scale * LOG2E
    cap_in, cap_out, has_cap = _softcap_args(softmax_scale, softcap)
    lse = lse.contiguous()

    delta = torch.empty_like(lse)
    pre_m = 64 if not _interpreting() else 16
    _prefix_attn_bwd_preprocess_kernel[(triton.cdiv(len_q, pre_m), batch * heads_q)](
        out, dout, delta, *out.stride(), *dout.stride(), heads_q, len_q, head_dim,
        BLOCK_M=pre_m, BLOCK_D=block_d,
    )

    dq = dk = dv = dpk = dpv = None
    if need_dkv:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        grid = (triton.cdiv(len_k, cfg.block_n), batch * heads_kv)
        _prefix_attn_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, mask, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *mask_strides, *dk.stride(),
            heads_q, heads_kv, group, len_q, len_k, head_dim, qk_scale, softmax_scale, cap_in, cap_out,
            CAUSAL=bool(causal), HAS_MASK=has_mask, PRECISION=precision, SOFTCAP=has_cap,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if need_dprefix:
        if num_prefix == 0:
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        else:
            n_blocks = triton.cdiv(num_prefix, cfg.block_n)
            units = batch * group * triton.cdiv(len_q, cfg.block_m)
            splits = _prefix_splits(units, n_blocks * heads_kv, q.device)
            per_split = triton.cdiv(units, splits)
            splits = triton.cdiv(units, per_split)
            partial_k = torch.empty((splits, heads_kv, num_prefix, head_dim), dtype=torch.float32, device=q.device)
            partial_v = torch.empty_like(partial_k)
            _prefix_attn_bwd_dprefix_kernel[(n_blocks, heads_kv, splits)](
                q, prefix_k, prefix_v, dout, lse, delta, partial_k, partial_v,
                *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(),
                batch, heads_q, heads_kv, group, len_q, num_prefix, head_dim, qk_scale, softmax_scale,
                cap_in, cap_out, units, per_split,
                PRECISION=precision, SOFTCAP=has_cap, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            # fixed-order reduction over the splits: bitwise reproducible
            dpk = partial_k.sum(0).to(prefix_k.dtype)
            dpv = partial_v.sum(0).to(prefix_v.dtype)
    if need_dq:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        block_m, block_n = cfg.block_n, cfg.block_m
        grid = (triton.cdiv(len_q, block_m), batch * heads_q)
        _prefix_attn_bwd_dq_kernel[grid](
            q, k, v, prefix_k, prefix_v, dout, lse, delta, mask, dq,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(),
            *mask_strides, *dq.stride(),
            heads_q, group, len_q, len_k, num_prefix, head_dim, qk_scale, softmax_scale, cap_in, cap_out,
            CAUSAL=bool(causal), HAS_MASK=has_mask, PRECISION=precision, SOFTCAP=has_cap,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv, dpk, dpv
