"""Triton kernels for prefix attention. Launchers live in ``prefix_attn/triton/launch.py``.

Layout (strides are passed for every tensor, so non-contiguous views are read in place)::

    Q, DO, O:   [B, Hq,  Tq, D]        K, V:     [B, Hkv, Tk, D]
    PK, PV:     [Hkv, P, D]            MASK:     [B, Tk] uint8 (1 = visible)
    LSE, DELTA: [B, Hq, Tq] float32, contiguous

Softmax runs in base 2 (scores are pre-multiplied by softmax_scale * log2(e): exp2 is one instruction on the
GPU); LSE is stored in natural log. Query ``i`` sits at text position ``i + DIAG`` with ``DIAG = Tk - Tq``.

Softcapping (``SOFTCAP``, compile-time): a score ``s = softmax_scale * q.k`` becomes ``c * tanh(s / c)`` before
the softmax (prefix and text columns alike); the kernels get ``cap_in = softmax_scale / c`` and
``cap_out = c * log2(e)``, and the backward multiplies dS by ``1 - tanh^2``, recomputed from the scores.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation. PRECISION "upcast" multiplies in float32: Triton's CPU interpreter
    (3.9) returns garbage for bfloat16 dots, and a bf16 x bf16 product is exact in float32 anyway."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    """tanh through exp2 (interpreter and GPU alike); saturates to +-1 without overflow trouble."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _text_visible(qpos, kpos, b, Tk, DIAG, MASK, stride_mb, stride_mn,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Bool tile: text key kpos is in range, causally visible from query qpos and not padded.

    qpos/kpos are broadcastable index tiles ([M, 1] and [1, N], or transposed for the backward)."""
    visible = (kpos < Tk) & (qpos >= 0)
    if CAUSAL:
        visible = visible & (kpos <= qpos + DIAG)
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_mb + kpos * stride_mn, mask=kpos < Tk, other=0)
        visible = visible & (keep != 0)
    return visible


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, in_range, d_valid, visible, qk_scale, cap_in, cap_out,
               PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step over a key block. k_ptrs: [D, N] (transposed), v_ptrs: [N, D]."""
    k = tl.load(k_ptrs, mask=d_valid[:, None] & in_range[None, :], other=0.0)
    if SOFTCAP:
        s = _tanh(_dot(q, k, PRECISION) * cap_in) * cap_out
    else:
        s = _dot(q, k, PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=in_range[:, None] & d_valid[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefix_attn_fwd_kernel(
    Q, K, V, PK, PV, MASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Tq, Tk, P, D, qk_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit row offsets: tensors may exceed 2**31 elements
    h = pid_bh % H
    hk = h // GROUP
    DIAG = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    m_valid = offs_m < Tq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # prefix: one shared copy per kv head, visible to every query, no mask but the ragged end
    pk_base = PK + hk * stride_pkh
    pv_base = PV + hk * stride_pvh
    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < P
        k_ptrs = pk_base + cols[None, :] * stride_pkn + offs_d[:, None] * stride_pkd
        v_ptrs = pv_base + cols[:, None] * stride_pvn + offs_d[None, :] * stride_pvd
        visible = in_range[None, :] & m_valid[:, None]
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, in_range, d_valid, visible, qk_scale,
                                   cap_in, cap_out, PRECISION, SOFTCAP)

    # text: key blocks up to the diagonal of this query block (blocks above it are skipped)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + DIAG)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < Tk
        k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        visible = _text_visible(offs_m[:, None], cols[None, :], b, Tk, DIAG, MASK, stride_mb, stride_mn,
                                CAUSAL, HAS_MASK)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, in_range, d_valid, visible, qk_scale,
                                   cap_in, cap_out, PRECISION, SOFTCAP)

    empty = l_i == 0.0  # saw no key at all: output 0, lse = +inf so backward's p = exp(s - lse) = 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=m_valid)


@triton.jit
def _prefix_attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O, in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit row offsets: tensors may exceed 2**31 elements
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=valid, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=valid, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, b, h, start_m,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_dob, stride_doh, stride_dom, stride_dod,
                  stride_mb, stride_mn,
                  offs_n, offs_d, H, Tq, Tk, D, qk_scale, cap_in, cap_out,
                  IS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate one query block's contribution to dK/dV of a key block, in transposed form.

    k, v: [N, D]; dk, dv: [N, D] float32. For prefix keys every query sees every slot (IS_PREFIX)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Tq
    d_valid = offs_d < D
    row = (b * H + h) * Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    lse2 = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
    if SOFTCAP:
        t_t = _tanh(_dot(k, tl.trans(q), PRECISION) * cap_in)  # [N, M]
        s_t = t_t * cap_out
    else:
        s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale  # [N, M]
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if not IS_PREFIX:
        visible_t = _text_visible(offs_m[None, :], offs_n[:, None], b, Tk, Tk - Tq, MASK, stride_mb, stride_mn,
                                  CAUSAL, HAS_MASK)
        p_t = tl.where(visible_t, p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, PRECISION)
    dp_t = _dot(v, tl.trans(do), PRECISION)  # [N, M]
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    H, HKV, GROUP, Tq, Tk, D, qk_scale, sm_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Text dK/dV: one program per (key block, b * Hkv); loops over the GROUP query heads (no atomics).

    DK and DV are written with the same strides (both allocated contiguous)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_valid = (offs_n < Tk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_valid, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_valid, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # first query that can see key start_n: i + (Tk - Tq) >= start_n
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, start_n - (Tk - Tq)) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for start_m in range(lo, Tq, BLOCK_M):
            dk, dv = _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, b, h, start_m,
                                   stride_qb, stride_qh, stride_qm, stride_qd,
                                   stride_dob, stride_doh, stride_dom, stride_dod,
                                   stride_mb, stride_mn, offs_n, offs_d, H, Tq, Tk, D, qk_scale,
                                   cap_in, cap_out, False, CAUSAL, HAS_MASK, PRECISION, SOFTCAP, BLOCK_M)
    out_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_valid)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_valid)


@triton.jit
def _prefix_attn_bwd_dprefix_kernel(
    Q, PK, PV, DO, LSE, DELTA, DPK, DPV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    B, H, HKV, GROUP, Tq, P, D, qk_scale, sm_scale, cap_in, cap_out, UNITS, UNITS_PER_SPLIT,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Prefix dK/dV, split for parallelism: one program per (prefix block, kv head, split).

    The work for a kv head is UNITS = B * GROUP * cdiv(Tq, BLOCK_M) query blocks; split s takes units
    [s * UNITS_PER_SPLIT, (s + 1) * UNITS_PER_SPLIT) and writes float32 partials DPK/DPV[s, hk, P, D]
    (contiguous), which the launcher sums in a fixed order: deterministic, no atomics."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_valid = (offs_n < P)[:, None] & (offs_d < D)[None, :]
    k = tl.load(PK + hk * stride_pkh + offs_n[:, None] * stride_pkn + offs_d[None, :] * stride_pkd,
                mask=kv_valid, other=0.0)
    v = tl.load(PV + hk * stride_pvh + offs_n[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
                mask=kv_valid, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    num_m = tl.cdiv(Tq, BLOCK_M)
    u_lo = split * UNITS_PER_SPLIT
    u_hi = tl.minimum(UNITS, u_lo + UNITS_PER_SPLIT)
    for u in range(u_lo, u_hi):
        b = (u // (GROUP * num_m)).to(tl.int64)
        rem = u % (GROUP * num_m)
        h = hk * GROUP + rem // num_m
        start_m = (rem % num_m) * BLOCK_M
        dk, dv = _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, Q, b, h, start_m,
                               stride_qb, stride_qh, stride_qm, stride_qd,
                               stride_dob, stride_doh, stride_dom, stride_dod,
                               0, 0, offs_n, offs_d, H, Tq, Tq, D, qk_scale, cap_in, cap_out,
                               True, False, False, PRECISION, SOFTCAP, BLOCK_M)
    out_off = ((split * HKV + hk) * P + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(DPK + out_off, dk * sm_scale, mask=kv_valid)
    tl.store(DPV + out_off, dv, mask=kv_valid)


@triton.jit
def _bwd_q_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, in_range, d_valid, visible, qk_scale, cap_in, cap_out,
                 PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """dQ contribution of one key block. k_ptrs/v_ptrs: [N, D]."""
    kv_valid = in_range[:, None] & d_valid[None, :]
    k = tl.load(k_ptrs, mask=kv_valid, other=0.0)
    v = tl.load(v_ptrs, mask=kv_valid, other=0.0)
    if SOFTCAP:
        t = _tanh(_dot(q, tl.trans(k), PRECISION) * cap_in)
        s = t * cap_out
    else:
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    p = tl.where(visible, p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _prefix_attn_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, MASK, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, Tq, Tk, P, D, qk_scale, sm_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ: one program per (query block, b * Hq), over the prefix blocks then the visible text blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit row offsets: tensors may exceed 2**31 elements
    h = pid_bh % H
    hk = h // GROUP
    DIAG = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Tq
    d_valid = offs_d < D
    qd_valid = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_valid, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=qd_valid, other=0.0)
    lse2 = tl.load(LSE + pid_bh * Tq + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < P
        k_ptrs = PK + hk * stride_pkh + cols[:, None] * stride_pkn + offs_d[None, :] * stride_pkd
        v_ptrs = PV + hk * stride_pvh + cols[:, None] * stride_pvn + offs_d[None, :] * stride_pvd
        visible = in_range[None, :] & m_valid[:, None]
        dq = _bwd_q_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, in_range, d_valid, visible, qk_scale,
                          cap_in, cap_out, PRECISION, SOFTCAP)

    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + DIAG)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < Tk
        k_ptrs = K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        visible = _text_visible(offs_m[:, None], cols[None, :], b, Tk, DIAG, MASK, stride_mb, stride_mn,
                                CAUSAL, HAS_MASK)
        dq = _bwd_q_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, in_range, d_valid, visible, qk_scale,
                          cap_in, cap_out, PRECISION, SOFTCAP)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_valid)
