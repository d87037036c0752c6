"""Backward Triton kernels for prefix attention: text dK/dV, the split prefix dK/dV and its reduction, and dQ.

Layouts, conventions and the helpers they share are described in ``kernels.py``.
"""

import triton
import triton.language as tl

from .kernels import (
    GENERIC_INTS,
    _causal_bounds,
    _dot,
    _dropout_keep,
    _load,
    _load_seed,
    _query_block,
    _row_prefix,
    _seq_bounds,
    _store,
    _tanh,
)


@triton.jit
def _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, q_row0, Tq,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_dob, stride_doh, stride_dom, stride_dod, stride_lb, stride_lh,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """q, dO [M, D], lse in base 2 and delta [M] of one query block (rows q_row0 + start_m ...); rows past Tq
    read q = dO = 0 and lse = +inf, so their probabilities are 0 and they need no mask."""
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows_m
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Tq
    start = q_row0 + start_m.to(tl.int64)
    q = _load(Q + b * stride_qb + h * stride_qh + start * stride_qm, rows_m, offs_d, stride_qm, stride_qd, m_valid,
              HEAD_DIM, BLOCK_D, True)
    do = _load(DO + b * stride_dob + h * stride_doh + start * stride_dom, rows_m, offs_d, stride_dom, stride_dod,
               m_valid, HEAD_DIM, BLOCK_D, True)
    row = b * stride_lb + h * stride_lh + q_row0
    lse2 = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, visible_t, qk_scale, cap_in, cap_out,
                 seed, b, h, q0, cols, drop_thr, drop_scale,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """One query block's contribution to dK/dV of a key block, in transposed form.

    k, v, dk, dv: [N, D] (dk, dv float32); q, do: [M, D]; visible_t: [N, M] bool when MASKED; q0 (first
    query) and cols [N] (dropout columns) name the tile for DROPOUT."""
    qk_t = _dot(k, tl.trans(q), PRECISION)  # [N, M]
    if SOFTCAP:
        t_t = _tanh(qk_t * cap_in)
        p_t = tl.math.exp2(t_t * cap_out - lse2[None, :])
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(visible_t, p_t, 0.0)
    dp_t = _dot(v, tl.trans(do), PRECISION)  # [N, M]
    if DROPOUT:
        keep_t = _dropout_keep(seed, b, h, q0, cols, drop_thr, q.shape[0], True)
        dv += _dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, PRECISION)  # times drop_scale at the end
        dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
    else:
        dv += _dot(p_t.to(do.dtype), do, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=GENERIC_INTS)
def _prefix_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, CU_Q, CU_K, SEED, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_lb, stride_lh,
    H, HKV, GROUP, Tq, Tk, P, qk_scale, sm_scale, cap_in, cap_out, drop_thr, drop_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Text dK/dV: one program per (key block, b * Hkv). One flat loop over (query head of the group, query
    block) pairs (no atomics, no pipeline drain between heads): first the blocks that cross the diagonal,
    then the blocks that see the whole key block. DK and DV share strides (both allocated contiguous)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    q_row0, k_row0, Tq, Tk = _seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    DIAG = Tk - Tq
    start_n = pid_n * BLOCK_N
    rows_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + rows_n
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Tk
    seed = _load_seed(SEED, DROPOUT)
    start = k_row0 + start_n.to(tl.int64)
    k = _load(K + b * stride_kb + hk * stride_kh + start * stride_kn, rows_n, offs_d, stride_kn, stride_kd, n_valid,
              HEAD_DIM, BLOCK_D, True)
    v = _load(V + b * stride_vb + hk * stride_vh + start * stride_vn, rows_n, offs_d, stride_vn, stride_vd, n_valid,
              HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full_lo = 0
    if CAUSAL:  # the blocks that cross the diagonal: only compiled when causal (with CAUSAL=False their count is
        # the constant 0, and a loop dividing by it pipelines into copies from poison addresses: the first GPU crash)
        lo = tl.maximum(0, start_n - DIAG) // BLOCK_M * BLOCK_M  # first block with a query that sees start_n
        full_lo = tl.cdiv(tl.maximum(0, start_n + BLOCK_N - 1 - DIAG), BLOCK_M) * BLOCK_M  # sees all BLOCK_N
        n_diag = tl.cdiv(tl.maximum(tl.minimum(full_lo, Tq) - lo, 0), BLOCK_M)
        per_head = tl.maximum(n_diag, 1)  # never a division by 0, even in code the pipeliner hoists
        for u in range(0, GROUP * n_diag):
            h = hk * GROUP + u // per_head
            start_m = lo + (u % per_head) * BLOCK_M
            q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, q_row0, Tq,
                                                  stride_qb, stride_qh, stride_qm, stride_qd,
                                                  stride_dob, stride_doh, stride_dom, stride_dod, stride_lb,
                                                  stride_lh, HEAD_DIM, BLOCK_M, BLOCK_D)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            visible_t = offs_n[:, None] <= offs_m[None, :] + DIAG
            dk, dv = _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, visible_t, qk_scale, cap_in, cap_out,
                                  seed, b, h, start_m, P + offs_n, drop_thr, drop_scale, True, PRECISION, SOFTCAP,
                                  DROPOUT)
    n_full = tl.cdiv(tl.maximum(Tq - full_lo, 0), BLOCK_M)
    per_head_full = tl.maximum(n_full, 1)
    for u in range(0, GROUP * n_full):
        h = hk * GROUP + u // per_head_full
        start_m = full_lo + (u % per_head_full) * BLOCK_M
        q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, q_row0, Tq,
                                              stride_qb, stride_qh, stride_qm, stride_qd,
                                              stride_dob, stride_doh, stride_dom, stride_dod, stride_lb, stride_lh,
                                              HEAD_DIM, BLOCK_M, BLOCK_D)
        dk, dv = _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, 0, qk_scale, cap_in, cap_out,
                              seed, b, h, start_m, P + offs_n, drop_thr, drop_scale,
                              False, PRECISION, SOFTCAP, DROPOUT)
    if DROPOUT:
        dv = dv * drop_scale
    if HAS_MASK:  # a padded key has p = 0 for every query: its rows of dK and dV are exactly zero
        keep = tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=n_valid, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    out_base = DK + b * stride_dkb + hk * stride_dkh + start * stride_dkn
    _store(out_base, rows_n, offs_d, stride_dkn, stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), n_valid,
           HEAD_DIM, BLOCK_D)
    out_base = DV + b * stride_dkb + hk * stride_dkh + start * stride_dkn
    _store(out_base, rows_n, offs_d, stride_dkn, stride_dkd, dv.to(DV.dtype.element_ty), n_valid,
           HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=GENERIC_INTS)
def _prefix_attn_bwd_dprefix_kernel(
    Q, PK, PV, DO, LSE, DELTA, ROWS, ROW_START, ROW_COUNT, ENTRY, LENS, CU_Q, SEED, DPK, DPV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pke, stride_pkh, stride_pkn, stride_pkd,
    stride_pve, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh,
    H, HKV, GROUP, Tq, P, N_START, qk_scale, sm_scale, cap_in, cap_out, drop_thr, drop_scale,
    UNITS, UNITS_PER_SPLIT, SPLITS, SPLIT_STRIDE,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr,
    VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Prefix dK/dV, split for parallelism: one program per (prefix block from N_START, kv head, used entry u and
    split s); program_id(2) = u * SPLITS + s.

    Shared prefix (no HAS_IDS): one entry, all B rows. Bank: entry u is ENTRY[u] and its rows are
    ROWS[ROW_START[u] : ROW_START[u] + ROW_COUNT[u]] (the batch rows sorted by entry). The work of (u, kv head) is
    ROW_COUNT[u] * GROUP * cdiv(Tq, BLOCK_M) query blocks; split s takes units [s * UNITS_PER_SPLIT, ...) and writes
    float32 partials DPK/DPV[s, u, hk, P, HEAD_DIM] (split s at s * SPLIT_STRIDE, the rest contiguous), which
    _prefix_attn_reduce_kernel sums in a fixed
    order: deterministic, no atomics. Every query sees every visible slot, so no step is masked; slots past the
    entry's length (HAS_LENS) are written as zeros."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    u_entry = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    offs_n = tl.multiple_of(N_START, 16) + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # pieces start at 16k
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < P
    seed = _load_seed(SEED, DROPOUT)
    e = 0
    row_start = 0
    units = UNITS
    if HAS_IDS:
        e = tl.load(ENTRY + u_entry).to(tl.int64)
        row_start = tl.load(ROW_START + u_entry)
        units = tl.load(ROW_COUNT + u_entry) * (GROUP * tl.cdiv(Tq, BLOCK_M))
    k = _load(PK + e * stride_pke + hk * stride_pkh, offs_n, offs_d, stride_pkn, stride_pkd, n_valid,
              HEAD_DIM, BLOCK_D, True)
    v = _load(PV + e * stride_pve + hk * stride_pvh, offs_n, offs_d, stride_pvn, stride_pvd, n_valid,
              HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    num_m = tl.maximum(tl.cdiv(Tq, BLOCK_M), 1)  # a divisor below: never 0
    u_lo = split * UNITS_PER_SPLIT
    u_hi = tl.minimum(units, u_lo + UNITS_PER_SPLIT)
    if HAS_LENS:  # a block wholly past the entry's length has zero gradient: skip its work
        if N_START + pid_n * BLOCK_N >= tl.load(LENS + e):
            u_hi = u_lo
    for u in range(u_lo, u_hi):
        b = (u // (GROUP * num_m)).to(tl.int64)
        if HAS_IDS:
            b = tl.load(ROWS + row_start + b).to(tl.int64)
        rem = u % (GROUP * num_m)
        h = hk * GROUP + rem // num_m
        start_m = (rem % num_m) * BLOCK_M
        q_row0, _, len_q, _ = _seq_bounds(CU_Q, CU_Q, b, Tq, Tq, VARLEN)  # Tq: the longest, with VARLEN
        q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, q_row0, len_q,
                                              stride_qb, stride_qh, stride_qm, stride_qd,
                                              stride_dob, stride_doh, stride_dom, stride_dod, stride_lb, stride_lh,
                                              HEAD_DIM, BLOCK_M, BLOCK_D)
        dk, dv = _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, 0, qk_scale, cap_in, cap_out,
                              seed, b, h, start_m, offs_n, drop_thr, drop_scale,
                              False, PRECISION, SOFTCAP, DROPOUT)
    if DROPOUT:
        dv = dv * drop_scale
    if HAS_LENS:  # invisible slots: exactly zero
        visible = (offs_n < tl.load(LENS + e))[:, None]
        dk = tl.where(visible, dk, 0.0)
        dv = tl.where(visible, dv, 0.0)
    out_base = split.to(tl.int64) * SPLIT_STRIDE + (u_entry * HKV + hk) * P * HEAD_DIM
    _store(DPK + out_base, offs_n, offs_d, HEAD_DIM, 1, dk * sm_scale, n_valid, HEAD_DIM, BLOCK_D)
    _store(DPV + out_base, offs_n, offs_d, HEAD_DIM, 1, dv, n_valid, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=GENERIC_INTS)
def _prefix_attn_reduce_kernel(PART_K, PART_V, DPK, DPV, ENTRY, SPLITS, SPLIT_STRIDE, NUMEL, PER_ENTRY,
                               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """DPK/DPV[i] = sum over s = 0, 1, ... of the float32 partials [SPLITS, SPLIT_STRIDE] (the first NUMEL of each
    row; SPLIT_STRIDE, a multiple of 16 and specialised, keeps the loads vectorised), cast to the output dtype:
    one launch for both gradients, a fixed summation order. With HAS_IDS the NUMEL = U * PER_ENTRY elements are U
    used entries, written to the bank rows ENTRY[u] (the other rows of the zero-filled bank gradient stay zero)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    in_row = offs < SPLIT_STRIDE  # the loads' mask: constant over 16 elements (vector loads); the pad is never stored
    dest = offs
    if HAS_IDS:
        dest = tl.load(ENTRY + offs // PER_ENTRY, mask=ok, other=0).to(tl.int64) * PER_ENTRY + offs % PER_ENTRY
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc_k += tl.load(PART_K + s * SPLIT_STRIDE + offs, mask=in_row, other=0.0)
        acc_v += tl.load(PART_V + s * SPLIT_STRIDE + offs, mask=in_row, other=0.0)
    tl.store(DPK + dest, acc_k.to(DPK.dtype.element_ty), mask=ok)
    tl.store(DPV + dest, acc_v.to(DPV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_q_step(dq, q, do, lse2, delta, k, v, visible, qk_scale, cap_in, cap_out,
                seed, b, h, q0, cols, drop_thr, drop_scale,
                MASKED: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """dQ contribution of one key block. k, v: [N, D]; a zero row of k contributes nothing."""
    qk = _dot(q, tl.trans(k), PRECISION)
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        p = tl.math.exp2(t * cap_out - lse2[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    if DROPOUT:
        dp = tl.where(_dropout_keep(seed, b, h, q0, cols, drop_thr, q.shape[0], False), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit(do_not_specialize=GENERIC_INTS)
def _prefix_attn_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, MASK, IDS, LENS, CU_Q, CU_K, SEED, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pke, stride_pkh, stride_pkn, stride_pkd,
    stride_pve, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    H, GROUP, Tq, Tk, P, qk_scale, sm_scale, cap_in, cap_out, drop_thr, drop_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ: one program per (query block, b * Hq), over the row's prefix blocks then the visible text blocks.

    Key rows past the end and padded keys are loaded as zeros (no mask); only the diagonal blocks are masked."""
    b, h, hk, q_row0, k_row0, Tq, Tk, start_m = _query_block(CU_Q, CU_K, H, GROUP, Tq, Tk, CAUSAL, VARLEN, BLOCK_M)
    DIAG = Tk - Tq
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows_m
    rows_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, q_row0, Tq,
                                          stride_qb, stride_qh, stride_qm, stride_qd,
                                          stride_dob, stride_doh, stride_dom, stride_dod, stride_lb, stride_lh,
                                          HEAD_DIM, BLOCK_M, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    seed = _load_seed(SEED, DROPOUT)

    e, n_slots = _row_prefix(IDS, LENS, b, P, HAS_IDS, HAS_LENS)
    pk_base = PK + e * stride_pke + hk * stride_pkh
    pv_base = PV + e * stride_pve + hk * stride_pvh
    for start_n in range(0, n_slots, BLOCK_N):
        in_range = start_n + rows_n < n_slots
        k = _load(pk_base + start_n * stride_pkn, rows_n, offs_d, stride_pkn, stride_pkd, in_range,
                  HEAD_DIM, BLOCK_D, True)
        v = _load(pv_base + start_n * stride_pvn, rows_n, offs_d, stride_pvn, stride_pvd, in_range,
                  HEAD_DIM, BLOCK_D, True)
        dq = _bwd_q_step(dq, q, do, lse2, delta, k, v, 0, qk_scale, cap_in, cap_out, seed, b, h, start_m,
                         start_n + rows_n, drop_thr, drop_scale, False, PRECISION, SOFTCAP, DROPOUT)

    k_base = K + b * stride_kb + hk * stride_kh + k_row0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k_row0 * stride_vn
    mask_base = MASK + b * stride_mb
    full_hi, hi = _causal_bounds(start_m, Tk, DIAG, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_hi, BLOCK_N):  # running 64-bit pointers, as in the forward
        keep = rows_n
        if HAS_MASK:
            keep = tl.load(mask_base + rows_n * stride_mn) != 0
        k = _load(k_base, rows_n, offs_d, stride_kn, stride_kd, keep, HEAD_DIM, BLOCK_D, HAS_MASK)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, rows_n, HEAD_DIM, BLOCK_D, False)
        dq = _bwd_q_step(dq, q, do, lse2, delta, k, v, 0, qk_scale, cap_in, cap_out, seed, b, h, start_m,
                         P + start_n + rows_n, drop_thr, drop_scale, False, PRECISION, SOFTCAP, DROPOUT)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn
    for start_n in range(full_hi, hi, BLOCK_N):
        cols = start_n + rows_n
        in_range = cols < Tk
        keep = in_range
        if HAS_MASK:
            keep = keep & (tl.load(mask_base + rows_n * stride_mn, mask=in_range, other=0) != 0)
        k = _load(k_base, rows_n, offs_d, stride_kn, stride_kd, keep, HEAD_DIM, BLOCK_D, True)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, in_range, HEAD_DIM, BLOCK_D, True)
        visible = cols[None, :] <= offs_m[:, None] + DIAG
        dq = _bwd_q_step(dq, q, do, lse2, delta, k, v, visible, qk_scale, cap_in, cap_out, seed, b, h, start_m,
                         P + cols, drop_thr, drop_scale, CAUSAL, PRECISION, SOFTCAP, DROPOUT)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn

    dq_base = DQ + b * stride_dqb + h * stride_dqh + (q_row0 + start_m.to(tl.int64)) * stride_dqm
    _store(dq_base, rows_m, offs_d, stride_dqm, stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m < Tq,
           HEAD_DIM, BLOCK_D)
