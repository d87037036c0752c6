"""Triton kernels for prefix attention. Launchers live in ``prefix_attn/triton/launch.py``.

Layout (strides are passed for every tensor, so non-contiguous views are read in place)::

    Q, DO, O:   [B, Hq,  Tq, D]        K, V:     [B, Hkv, Tk, D]
    PK, PV:     [N, Hkv, P, D]         MASK:     [B, Tk] uint8 (1 = visible)
    IDS:        [B] int32 (HAS_IDS)    LENS:     [N] int32 (HAS_LENS)

The prefix is a bank of N entries (N = 1 and stride 0 for a shared prefix): row ``b`` reads entry
``IDS[b]`` (0 without HAS_IDS) and its first ``LENS[entry]`` slots (P without HAS_LENS), a two-number per-row
descriptor that the forward and dQ loops read once.
    LSE, DELTA: [B, Hq, Tq] float32, contiguous

Softmax runs in base 2 (scores are multiplied by softmax_scale * log2(e) in the same FMA that subtracts the
running max: exp2 is one instruction on the GPU); LSE is stored in natural log. Query ``i`` sits at text
position ``i + DIAG`` with ``DIAG = Tk - Tq``.

Masking is paid only where it can change a result: the forward masks the ragged ends of the prefix and the
text, the key blocks that cross the causal diagonal and (with a padding mask) the text blocks; the backward
masks only the blocks that cross the diagonal. Everything else runs the unmasked step: a key row past the end
is loaded as zeros and its gradient rows are never stored, and a padded key is loaded as zeros in dQ (its
dS column then meets a zero row) and its dK/dV rows are zeroed once at the end.

``HEAD_DIM`` is a compile-time constant; when it is a power of two >= 16 no load carries a head-dim mask.
Base offsets are 64-bit scalars (a tensor row may exceed 2**31 elements); offsets inside a tile stay 32-bit.

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
def _load(base, rows, offs_d, stride_r, stride_d, rows_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          CHECK_ROWS: tl.constexpr):
    """[R, BLOCK_D] tile at base + rows * stride_r + d * stride_d; rows_ok [R] masks rows when CHECK_ROWS,
    and head-dim columns are masked only when BLOCK_D > HEAD_DIM. Masked elements read 0."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if BLOCK_D == HEAD_DIM:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _load_t(base, rows, offs_d, stride_r, stride_d, rows_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            CHECK_ROWS: tl.constexpr):
    """The transpose of _load: a [BLOCK_D, R] tile (the forward's K operand, read in the layout the dot wants)."""
    ptrs = base + rows[None, :] * stride_r + offs_d[:, None] * stride_d
    if BLOCK_D == HEAD_DIM:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=rows_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=rows_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
    return x


@triton.jit
def _store(base, rows, offs_d, stride_r, stride_d, x, rows_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=rows_ok[:, None])
    else:
        tl.store(ptrs, x, mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _row_prefix(IDS, LENS, b, P, HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr):
    """(entry, number of visible slots) of batch row b."""
    e = 0
    if HAS_IDS:
        e = tl.load(IDS + b).to(tl.int64)
    n = P
    if HAS_LENS:
        n = tl.load(LENS + e)
    return e, n


@triton.jit
def _causal_bounds(start_m, Tk, DIAG, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of a query block [start_m, start_m + BLOCK_M): keys [0, full_hi) need no causal or range mask
    (whole BLOCK_N blocks), keys [full_hi, hi) are the diagonal blocks and the ragged tail."""
    if CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M + DIAG)
        full_hi = tl.minimum(Tk, start_m + DIAG + 1) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full_hi = Tk // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_t, v, visible, qk_scale, cap_in, cap_out,
              MASKED: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step over a key block. k_t: [D, N], v: [N, D]; visible: [M, N] bool when MASKED.

    m_i is the running max of the base-2 scores; with MASKED a row may still have seen nothing (m_i = -inf)."""
    qk = _dot(q, k_t, PRECISION)
    if SOFTCAP:
        s = _tanh(qk * cap_in) * cap_out
        scale = 1.0
    else:
        s = qk
        scale = qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        m_use = m_new
    p = tl.math.exp2(s * scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefix_attn_fwd_kernel(
    Q, K, V, PK, PV, MASK, IDS, LENS, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pke, stride_pkh, stride_pkn, stride_pkd,
    stride_pve, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Tq, Tk, P, qk_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest query blocks (most keys) start first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    DIAG = Tk - Tq
    start_m = pid_m * BLOCK_M
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows_m
    rows_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Tq

    q_base = Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qm
    q = _load(q_base, rows_m, offs_d, stride_qm, stride_qd, m_valid, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # prefix: this row's entry, read in place, visible to every query; only the ragged end is masked
    e, P = _row_prefix(IDS, LENS, b, P, HAS_IDS, HAS_LENS)
    pk_base = PK + e * stride_pke + hk * stride_pkh
    pv_base = PV + e * stride_pve + hk * stride_pvh
    p_full = P // BLOCK_N * BLOCK_N
    for start_n in range(0, p_full, BLOCK_N):
        k = _load_t(pk_base + start_n * stride_pkn, rows_n, offs_d, stride_pkn, stride_pkd, rows_n,
                  HEAD_DIM, BLOCK_D, False)
        v = _load(pv_base + start_n * stride_pvn, rows_n, offs_d, stride_pvn, stride_pvd, rows_n,
                  HEAD_DIM, BLOCK_D, False)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, 0, qk_scale, cap_in, cap_out,
                                  False, PRECISION, SOFTCAP)
    for start_n in range(p_full, P, BLOCK_N):  # the ragged end: at most one block (a loop keeps it compact)
        in_range = start_n + rows_n < P
        k = _load_t(pk_base + start_n * stride_pkn, rows_n, offs_d, stride_pkn, stride_pkd, in_range,
                    HEAD_DIM, BLOCK_D, True)
        v = _load(pv_base + start_n * stride_pvn, rows_n, offs_d, stride_pvn, stride_pvd, in_range,
                  HEAD_DIM, BLOCK_D, True)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, in_range[None, :], qk_scale, cap_in, cap_out,
                                  True, PRECISION, SOFTCAP)

    # text: whole blocks below the diagonal (masked only by padding), then the diagonal blocks and the tail
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASK + b * stride_mb
    full_hi, hi = _causal_bounds(start_m, Tk, DIAG, CAUSAL, BLOCK_M, BLOCK_N)
    for _ in range(0, full_hi, BLOCK_N):  # running 64-bit pointers: no 32-bit start_n * stride product
        k = _load_t(k_base, rows_n, offs_d, stride_kn, stride_kd, rows_n, HEAD_DIM, BLOCK_D, False)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, rows_n, HEAD_DIM, BLOCK_D, False)
        visible = 0
        if HAS_MASK:
            visible = (tl.load(mask_base + rows_n * stride_mn) != 0)[None, :]
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, visible, qk_scale, cap_in, cap_out,
                                  HAS_MASK, PRECISION, SOFTCAP)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn
    for start_n in range(full_hi, hi, BLOCK_N):
        cols = start_n + rows_n
        in_range = cols < Tk
        k = _load_t(k_base, rows_n, offs_d, stride_kn, stride_kd, in_range, HEAD_DIM, BLOCK_D, True)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, in_range, HEAD_DIM, BLOCK_D, True)
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + DIAG)
        if HAS_MASK:
            visible = visible & (tl.load(mask_base + rows_n * stride_mn, mask=in_range, other=0) != 0)[None, :]
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, visible, qk_scale, cap_in, cap_out,
                                  True, PRECISION, SOFTCAP)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn

    empty = l_i == 0.0  # saw no key at all: output 0, lse = +inf so backward's p = exp(s - lse) = 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_om
    _store(o_base, rows_m, offs_d, stride_om, stride_od, out.to(O.dtype.element_ty), m_valid, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_valid)


@triton.jit
def _prefix_attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O, in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rows_m
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Tq
    start = (pid_m * BLOCK_M).to(tl.int64)
    o = _load(O + b * stride_ob + h * stride_oh + start * stride_om, rows_m, offs_d, stride_om, stride_od, m_valid,
              HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load(DO + b * stride_dob + h * stride_doh + start * stride_dom, rows_m, offs_d, stride_dom, stride_dod,
               m_valid, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, H, Tq,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """q, dO [M, D], lse in base 2 and delta [M] of one query block; rows past Tq read q = dO = 0 and
    lse = +inf, so their probabilities are 0 and they need no mask."""
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows_m
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Tq
    start = start_m.to(tl.int64)
    q = _load(Q + b * stride_qb + h * stride_qh + start * stride_qm, rows_m, offs_d, stride_qm, stride_qd, m_valid,
              HEAD_DIM, BLOCK_D, True)
    do = _load(DO + b * stride_dob + h * stride_doh + start * stride_dom, rows_m, offs_d, stride_dom, stride_dod,
               m_valid, HEAD_DIM, BLOCK_D, True)
    row = (b * H + h) * Tq
    lse2 = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, visible_t, qk_scale, cap_in, cap_out,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """One query block's contribution to dK/dV of a key block, in transposed form.

    k, v, dk, dv: [N, D] (dk, dv float32); q, do: [M, D]; visible_t: [N, M] bool when MASKED."""
    qk_t = _dot(k, tl.trans(q), PRECISION)  # [N, M]
    if SOFTCAP:
        t_t = _tanh(qk_t * cap_in)
        p_t = tl.math.exp2(t_t * cap_out - lse2[None, :])
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
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
    H, HKV, GROUP, Tq, Tk, qk_scale, sm_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Text dK/dV: one program per (key block, b * Hkv). One flat loop over (query head of the group, query
    block) pairs (no atomics, no pipeline drain between heads): first the blocks that cross the diagonal,
    then the blocks that see the whole key block. DK and DV share strides (both allocated contiguous)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    DIAG = Tk - Tq
    start_n = pid_n * BLOCK_N
    rows_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + rows_n
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Tk
    start = start_n.to(tl.int64)
    k = _load(K + b * stride_kb + hk * stride_kh + start * stride_kn, rows_n, offs_d, stride_kn, stride_kd, n_valid,
              HEAD_DIM, BLOCK_D, True)
    v = _load(V + b * stride_vb + hk * stride_vh + start * stride_vn, rows_n, offs_d, stride_vn, stride_vd, n_valid,
              HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = tl.maximum(0, start_n - DIAG) // BLOCK_M * BLOCK_M  # first block with a query that sees start_n
        full_lo = tl.cdiv(tl.maximum(0, start_n + BLOCK_N - 1 - DIAG), BLOCK_M) * BLOCK_M  # sees all BLOCK_N
    else:
        lo = 0
        full_lo = 0
    n_diag = tl.cdiv(tl.maximum(tl.minimum(full_lo, Tq) - lo, 0), BLOCK_M)
    n_full = tl.cdiv(tl.maximum(Tq - full_lo, 0), BLOCK_M)
    for u in range(0, GROUP * n_diag):
        h = hk * GROUP + u // n_diag
        start_m = lo + (u % n_diag) * BLOCK_M
        q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, H, Tq,
                                              stride_qb, stride_qh, stride_qm, stride_qd,
                                              stride_dob, stride_doh, stride_dom, stride_dod,
                                              HEAD_DIM, BLOCK_M, BLOCK_D)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        visible_t = offs_n[:, None] <= offs_m[None, :] + DIAG
        dk, dv = _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, visible_t, qk_scale, cap_in, cap_out,
                              True, PRECISION, SOFTCAP)
    for u in range(0, GROUP * n_full):
        h = hk * GROUP + u // n_full
        start_m = full_lo + (u % n_full) * BLOCK_M
        q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, H, Tq,
                                              stride_qb, stride_qh, stride_qm, stride_qd,
                                              stride_dob, stride_doh, stride_dom, stride_dod,
                                              HEAD_DIM, BLOCK_M, BLOCK_D)
        dk, dv = _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, 0, qk_scale, cap_in, cap_out,
                              False, PRECISION, SOFTCAP)
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


@triton.jit
def _prefix_attn_bwd_dprefix_kernel(
    Q, PK, PV, DO, LSE, DELTA, ROWS, ROW_START, ROW_COUNT, ENTRY, LENS, DPK, DPV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pke, stride_pkh, stride_pkn, stride_pkd,
    stride_pve, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, HKV, GROUP, Tq, P, N_START, qk_scale, sm_scale, cap_in, cap_out, UNITS, UNITS_PER_SPLIT, SPLITS,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Prefix dK/dV, split for parallelism: one program per (prefix block from N_START, kv head, used entry u and
    split s); program_id(2) = u * SPLITS + s.

    Shared prefix (no HAS_IDS): one entry, all B rows. Bank: entry u is ENTRY[u] and its rows are
    ROWS[ROW_START[u] : ROW_START[u] + ROW_COUNT[u]] (the batch rows sorted by entry). The work of (u, kv head) is
    ROW_COUNT[u] * GROUP * cdiv(Tq, BLOCK_M) query blocks; split s takes units [s * UNITS_PER_SPLIT, ...) and writes
    float32 partials DPK/DPV[s, u, hk, P, HEAD_DIM] (contiguous), which _prefix_attn_reduce_kernel sums in a fixed
    order: deterministic, no atomics. Every query sees every visible slot, so no step is masked; slots past the
    entry's length (HAS_LENS) are written as zeros."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    u_entry = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    offs_n = N_START + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < P
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
    num_m = tl.cdiv(Tq, BLOCK_M)
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
        q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, H, Tq,
                                              stride_qb, stride_qh, stride_qm, stride_qd,
                                              stride_dob, stride_doh, stride_dom, stride_dod,
                                              HEAD_DIM, BLOCK_M, BLOCK_D)
        dk, dv = _bwd_kv_step(dk, dv, k, v, q, do, lse2, delta, 0, qk_scale, cap_in, cap_out,
                              False, PRECISION, SOFTCAP)
    if HAS_LENS:  # invisible slots: exactly zero
        visible = (offs_n < tl.load(LENS + e))[:, None]
        dk = tl.where(visible, dk, 0.0)
        dv = tl.where(visible, dv, 0.0)
    n_used = tl.num_programs(2) // SPLITS
    out_base = ((split * n_used + u_entry) * HKV + hk) * P * HEAD_DIM
    _store(DPK + out_base, offs_n, offs_d, HEAD_DIM, 1, dk * sm_scale, n_valid, HEAD_DIM, BLOCK_D)
    _store(DPV + out_base, offs_n, offs_d, HEAD_DIM, 1, dv, n_valid, HEAD_DIM, BLOCK_D)


@triton.jit
def _prefix_attn_reduce_kernel(PART_K, PART_V, DPK, DPV, ENTRY, SPLITS, NUMEL, PER_ENTRY,
                               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """DPK/DPV[i] = sum over s = 0, 1, ... of the float32 partials [SPLITS, NUMEL], cast to the output dtype:
    one launch for both gradients, a fixed summation order. With HAS_IDS the NUMEL = U * PER_ENTRY elements are U
    used entries, written to the bank rows ENTRY[u] (the other rows of the zero-filled bank gradient stay zero)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    dest = offs
    if HAS_IDS:
        dest = tl.load(ENTRY + offs // PER_ENTRY, mask=ok, other=0).to(tl.int64) * PER_ENTRY + offs % PER_ENTRY
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc_k += tl.load(PART_K + s * NUMEL + offs, mask=ok, other=0.0)
        acc_v += tl.load(PART_V + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(DPK + dest, acc_k.to(DPK.dtype.element_ty), mask=ok)
    tl.store(DPV + dest, acc_v.to(DPV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_q_step(dq, q, do, lse2, delta, k, v, visible, qk_scale, cap_in, cap_out,
                MASKED: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
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
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _prefix_attn_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, MASK, IDS, LENS, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pke, stride_pkh, stride_pkn, stride_pkd,
    stride_pve, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, Tq, Tk, P, qk_scale, sm_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ: one program per (query block, b * Hq), over the row's prefix blocks then the visible text blocks.

    Key rows past the end and padded keys are loaded as zeros (no mask); only the diagonal blocks are masked."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest query blocks start first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    DIAG = Tk - Tq
    start_m = pid_m * BLOCK_M
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows_m
    rows_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse2, delta = _load_query_side(Q, DO, LSE, DELTA, b, h, start_m, H, Tq,
                                          stride_qb, stride_qh, stride_qm, stride_qd,
                                          stride_dob, stride_doh, stride_dom, stride_dod,
                                          HEAD_DIM, BLOCK_M, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    e, P = _row_prefix(IDS, LENS, b, P, HAS_IDS, HAS_LENS)
    pk_base = PK + e * stride_pke + hk * stride_pkh
    pv_base = PV + e * stride_pve + hk * stride_pvh
    for start_n in range(0, P, BLOCK_N):
        in_range = start_n + rows_n < P
        k = _load(pk_base + start_n * stride_pkn, rows_n, offs_d, stride_pkn, stride_pkd, in_range,
                  HEAD_DIM, BLOCK_D, True)
        v = _load(pv_base + start_n * stride_pvn, rows_n, offs_d, stride_pvn, stride_pvd, in_range,
                  HEAD_DIM, BLOCK_D, True)
        dq = _bwd_q_step(dq, q, do, lse2, delta, k, v, 0, qk_scale, cap_in, cap_out, False, PRECISION, SOFTCAP)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASK + b * stride_mb
    full_hi, hi = _causal_bounds(start_m, Tk, DIAG, CAUSAL, BLOCK_M, BLOCK_N)
    for _ in range(0, full_hi, BLOCK_N):  # running 64-bit pointers, as in the forward
        keep = rows_n
        if HAS_MASK:
            keep = tl.load(mask_base + rows_n * stride_mn) != 0
        k = _load(k_base, rows_n, offs_d, stride_kn, stride_kd, keep, HEAD_DIM, BLOCK_D, HAS_MASK)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, rows_n, HEAD_DIM, BLOCK_D, False)
        dq = _bwd_q_step(dq, q, do, lse2, delta, k, v, 0, qk_scale, cap_in, cap_out, False, PRECISION, SOFTCAP)
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
        dq = _bwd_q_step(dq, q, do, lse2, delta, k, v, visible, qk_scale, cap_in, cap_out, CAUSAL, PRECISION,
                         SOFTCAP)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn

    dq_base = DQ + b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dqm
    _store(dq_base, rows_m, offs_d, stride_dqm, stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m < Tq,
           HEAD_DIM, BLOCK_D)
