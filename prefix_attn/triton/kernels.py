"""Triton kernels for prefix attention: shared helpers, the forward and the backward's delta preprocess; the
backward kernels are in ``kernels_bwd.py``, the launchers in ``launch.py``.

Layout (strides are passed for every tensor, so non-contiguous views are read in place)::

    Q, DO, O:   [B, Hq,  Tq, D]        K, V:     [B, Hkv, Tk, D]
    PK, PV:     [N, Hkv, P, D]         MASK:     [B, Tk] uint8 (1 = visible)
    IDS:        [B] int32 (HAS_IDS)    LENS:     [N] int32 (HAS_LENS)

The prefix is a bank of N entries (N = 1 and stride 0 for a shared prefix): row ``b`` reads entry
``IDS[b]`` (0 without HAS_IDS) and its first ``LENS[entry]`` slots (P without HAS_LENS), a two-number per-row
descriptor that the forward and dQ loops read once.
    LSE, DELTA: [B, Hq, Tq] float32, contiguous (strides stride_lb, stride_lh)

Packed sequences (VARLEN, compile-time): Q/DO/O are [total_q, Hq, D] and K/V [total_k, Hkv, D] (batch strides 0),
"batch row" b is sequence b, its rows CU_Q[b]..CU_Q[b+1] and keys CU_K[b]..CU_K[b+1] (int32 cumulative
lengths); LSE/DELTA are [Hq, total_q]. The grid covers the longest sequence; blocks past a sequence's end are
masked out like a ragged tail.

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

Split-KV decoding (``SPLIT_KV``, compile-time; ``prefix_attn/triton/decode_launch.py``, FlashDecoding with a
cascade prefix): the grid is (work items, Hkv) and a work item is one split of the keys for a tile of queries of
one kv head, the queries folded row-major as (row, query head of the GQA group, query):

    prefix item (entry in use u, split s, tile):  every row on entry u (a shared prefix: every row) against prefix
                                                  slots [s * PREFIX_KEYS_PER_SPLIT, (s + 1) * PREFIX_KEYS_PER_SPLIT):
                                                  the prefix is read once per tile, not once per row; a tile past the
                                                  entry's rows (a bank's entry with fewer rows than the most) has an
                                                  empty range and stores nothing
    text item (row b, split s, tile):             row b's GROUP * Tq queries against its text keys
                                                  [s * KEYS_PER_SPLIT, (s + 1) * KEYS_PER_SPLIT)

Prefix items come first. ROW_PLAN (int32, a bank only) is [entry [USED], first [USED], count [USED], rows [BATCH]]:
the entries some row chose and the rows grouped by entry (``checks.group_rows``). Each item writes float32 partials
to the scratch O [splits, BATCH, Hq, Tq, D] (normalised) and LSE [splits, BATCH, Hq, Tq] (base 2, -inf where the
split saw no key), prefix splits first; ``_prefix_attn_combine_kernel`` merges the splits of each query.

Attention dropout (``DROPOUT``, compile-time): every kernel regenerates the keep mask of a score tile from
(seed, b, h, query, column) with Philox (``_dropout_keep``, the mask of ``prefix_attn/dropout.py``); SEED is an
int64 0-d tensor, ``drop_thr = floor(p * 2**16)`` and ``drop_scale = 1 / (1 - p)``. The forward sums the
probabilities before dropout into l and the dropped ones into the output; the backward uses
dV = (P * Z)^T dO and dS = P * (Z * dP - delta) with Z = keep * drop_scale (dV accumulates keep * P and is
scaled once at the end: no 16-bit overflow of P * drop_scale).
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Integer arguments that Triton must not specialise on (`== 1` -> constant, `% 16 == 0` -> alignment attribute):
# shape integers, the padding mask's and the LSE's strides and the dropout threshold vary from call to call, and each
# distinct pattern would compile the whole kernel again. With this list a kernel compiles once per dtype, head dim,
# switch set and tile; the strides of Q/K/V/O/DO and the prefix stay specialised (16-byte alignment, unit stride of
# the head dim: vector loads), and they are fixed by the head dim for the usual layouts.
GENERIC_INTS = ("H", "HKV", "GROUP", "Tq", "Tk", "P", "N_START", "UNITS", "UNITS_PER_SPLIT", "SPLITS", "NUMEL",
                "PER_ENTRY", "drop_thr", "stride_mb", "stride_mn", "stride_lb", "stride_lh", "BATCH", "USED",
                "PREFIX_ROWS", "KEYS_PER_SPLIT", "PREFIX_KEYS_PER_SPLIT", "N_QUERIES")


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
def _dropout_keep(seed, b, h, q0, cols, drop_thr, BLOCK_Q: tl.constexpr, TRANS: tl.constexpr):
    """Keep mask of queries q0 .. q0 + BLOCK_Q - 1 (q0 a multiple of 8) and columns cols [N] (prefix slots first) of
    batch row b, query head h: [BLOCK_Q, N] bool, or [N, BLOCK_Q] with TRANS.

    One Philox-4x32-10 call (keyed by the int64 seed, counter (col, query // 8, h, b)) decides eight queries of a
    column: query q0 + 8 g + k takes 16-bit field k (word k // 2, low half for even k), kept when >= drop_thr. The
    [BLOCK_Q / 8, N] calls' eight fields are joined on new trailing axes and reshaped into the tile."""
    g = q0 // 8 + tl.arange(0, BLOCK_Q // 8)
    if TRANS:
        zero = cols[:, None] * 0 + g[None, :] * 0  # [N, BLOCK_Q // 8]
        c0 = (cols[:, None] + zero).to(tl.uint32)
        c1 = (g[None, :] + zero).to(tl.uint32)
    else:
        zero = g[:, None] * 0 + cols[None, :] * 0  # [BLOCK_Q // 8, N]
        c0 = (cols[None, :] + zero).to(tl.uint32)
        c1 = (g[:, None] + zero).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, (zero + h).to(tl.uint32), (zero + b).to(tl.uint32))
    # tl.join appends an axis: innermost joins pick i, then j, then l, giving [..., i, j, l] = field 4 i + 2 j + l
    # (word 2 i + j, half l) in row-major order
    lo = tl.join(tl.join((r0 & 0xFFFF) >= drop_thr, (r2 & 0xFFFF) >= drop_thr),
                 tl.join((r1 & 0xFFFF) >= drop_thr, (r3 & 0xFFFF) >= drop_thr))
    hi = tl.join(tl.join((r0 >> 16) >= drop_thr, (r2 >> 16) >= drop_thr),
                 tl.join((r1 >> 16) >= drop_thr, (r3 >> 16) >= drop_thr))
    keep = tl.join(lo, hi).to(tl.int8)
    if TRANS:
        keep = tl.reshape(keep, [cols.shape[0], BLOCK_Q])
    else:
        keep = tl.reshape(tl.permute(keep, (0, 2, 3, 4, 1)), [BLOCK_Q, cols.shape[0]])
    return keep != 0


@triton.jit
def _load_seed(SEED, DROPOUT: tl.constexpr):
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return seed


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
def _seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN: tl.constexpr):
    """(first query row, first key row, len_q, len_k) of batch row b: (0, 0, Tq, Tk), or sequence b of a
    packed batch."""
    q_row0 = 0
    k_row0 = 0
    if VARLEN:
        q_row0 = tl.load(CU_Q + b).to(tl.int64)
        k_row0 = tl.load(CU_K + b).to(tl.int64)
        Tq = (tl.load(CU_Q + b + 1) - q_row0).to(tl.int32)
        Tk = (tl.load(CU_K + b + 1) - k_row0).to(tl.int32)
    return q_row0, k_row0, Tq, Tk


@triton.jit
def _query_block(CU_Q, CU_K, H, GROUP, Tq, Tk, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """The (query block, b * Hq) program of the forward and dQ kernels: batch row b, head h, kv head hk, the row's
    offsets and lengths, and its first query start_m. Causal grids run the longest query blocks (most keys)
    first."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_row0, k_row0, Tq, Tk = _seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    return b, h, h // GROUP, q_row0, k_row0, Tq, Tk, pid_m * BLOCK_M


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
def _fwd_step(acc, m_i, l_i, q, k_t, v, visible, qk_scale, cap_in, cap_out, seed, b, h, q0, cols, drop_thr,
              MASKED: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """One online-softmax step over a key block. k_t: [D, N], v: [N, D]; visible: [M, N] bool when MASKED;
    q0 (first query) and cols [N] (dropout columns) name the tile for DROPOUT.

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
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, b, h, q0, cols, drop_thr, q.shape[0], False), p, 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _split_item(ROW_PLAN, BATCH, GROUP, Tq, Tk, P, USED, PREFIX_ROWS, KEYS_PER_SPLIT, PREFIX_KEYS_PER_SPLIT,
                HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The work item of a SPLIT_KV program (see the module docstring): (kv head hk, text row b, prefix entry e,
    scratch slot, prefix slots [p_lo, p_hi), text keys [t_lo, t_hi), and per query of the tile [BLOCK_M]: row,
    query head, query index, valid). A prefix item's text range and a text item's prefix range are empty."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    per_row = GROUP * Tq  # queries of one row and kv head
    p_splits = tl.cdiv(P, PREFIX_KEYS_PER_SPLIT)
    p_tiles = tl.cdiv(PREFIX_ROWS * per_row, BLOCK_M)
    n_prefix = USED * p_splits * p_tiles
    is_p = pid < n_prefix
    # tile fastest: the tiles of one split read the same keys, close in time (from L2)
    tiles = tl.maximum(tl.where(is_p, p_tiles, tl.cdiv(per_row, BLOCK_M)), 1)
    splits = tl.maximum(tl.where(is_p, p_splits, tl.cdiv(Tk, KEYS_PER_SPLIT)), 1)
    local = tl.where(is_p, pid, pid - n_prefix)
    tile = local % tiles
    split = (local // tiles) % splits
    owner = local // (tiles * splits)  # entry in use (prefix item) or row (text item)
    e = 0
    first = 0
    count = BATCH
    if HAS_IDS:
        u = tl.where(is_p, owner, 0)
        e = tl.load(ROW_PLAN + u).to(tl.int64)
        first = tl.load(ROW_PLAN + USED + u)
        count = tl.load(ROW_PLAN + 2 * USED + u)
    j = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    r = j // per_row
    i = j % per_row
    valid = r < tl.where(is_p, count, 1)
    row = tl.where(is_p, first + r, owner + r)  # a text item's valid queries have r = 0
    if HAS_IDS:  # (r < a scalar, not valid & is_p: the interpreter rejects a mask broadcast from a scalar)
        row = tl.where(is_p, tl.load(ROW_PLAN + 3 * USED + row, mask=r < tl.where(is_p, count, 0), other=0), row)
    keys = tl.where(is_p, PREFIX_KEYS_PER_SPLIT, KEYS_PER_SPLIT)
    lo = split * keys
    # a prefix tile with no query on its entry (tile * BLOCK_M >= count * per_row) reads no key: every row of it is
    # invalid, so it stores nothing (the combine reads each row's partials from its own entry's tiles)
    p_lo = tl.where(is_p, lo, 0)
    p_hi = tl.where(is_p & (tile * BLOCK_M < count * per_row), lo + keys, p_lo)
    t_hi = tl.where(is_p, 0, tl.minimum(lo + keys, Tk))
    slot = tl.where(is_p, split, p_splits + split)
    b = tl.where(is_p, 0, owner).to(tl.int64)
    return hk, b, e, slot, p_lo, p_hi, tl.where(is_p, 0, lo), t_hi, row, hk * GROUP + i // Tq, i % Tq, valid


@triton.jit(do_not_specialize=GENERIC_INTS)
def _prefix_attn_fwd_kernel(
    Q, K, V, PK, PV, MASK, IDS, LENS, CU_Q, CU_K, SEED, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pke, stride_pkh, stride_pkn, stride_pkd,
    stride_pve, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    H, GROUP, Tq, Tk, P, qk_scale, cap_in, cap_out, drop_thr, drop_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    # split-KV decoding only (None otherwise: constexpr, not kernel arguments); O and LSE are then the scratch
    SPLIT_KV: tl.constexpr = False, ROW_PLAN=None, BATCH=None, USED=None, PREFIX_ROWS=None, KEYS_PER_SPLIT=None,
    PREFIX_KEYS_PER_SPLIT=None,
):
    tl.static_assert(not (SPLIT_KV and (VARLEN or DROPOUT)), "SPLIT_KV takes padded inputs without dropout")
    rows_m = tl.arange(0, BLOCK_M)
    rows_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if SPLIT_KV:
        hk, b, e, slot, p_lo, p_hi, t_lo, t_hi, q_row, q_head, pos_m, m_valid = _split_item(
            ROW_PLAN, BATCH, GROUP, Tq, Tk, P, USED, PREFIX_ROWS, KEYS_PER_SPLIT, PREFIX_KEYS_PER_SPLIT, HAS_IDS,
            BLOCK_M)
        h = 0
        k_row0 = 0
        start_m = 0
        n_slots = P
        if HAS_LENS:
            n_slots = tl.load(LENS + e)
        q_offs = q_row.to(tl.int64) * stride_qb + q_head * stride_qh + pos_m * stride_qm
        q = _load(Q, q_offs, offs_d, 1, stride_qd, m_valid, HEAD_DIM, BLOCK_D, True)
    else:
        b, h, hk, q_row0, k_row0, Tq, Tk, start_m = _query_block(CU_Q, CU_K, H, GROUP, Tq, Tk, CAUSAL, VARLEN,
                                                                 BLOCK_M)
        pos_m = start_m + rows_m
        m_valid = pos_m < Tq
        q_base = Q + b * stride_qb + h * stride_qh + (q_row0 + start_m.to(tl.int64)) * stride_qm
        q = _load(q_base, rows_m, offs_d, stride_qm, stride_qd, m_valid, HEAD_DIM, BLOCK_D, True)
        e, n_slots = _row_prefix(IDS, LENS, b, P, HAS_IDS, HAS_LENS)
    DIAG = Tk - Tq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    seed = _load_seed(SEED, DROPOUT)

    # prefix: this row's entry, read in place, visible to every query; only the ragged end is masked
    pk_base = PK + e * stride_pke + hk * stride_pkh
    pv_base = PV + e * stride_pve + hk * stride_pvh
    p_full = n_slots // BLOCK_N * BLOCK_N
    if SPLIT_KV:  # this item's slots [p_lo, p_hi), a multiple of BLOCK_N apart
        lo_full, hi_full, lo_tail, hi_tail = p_lo, tl.minimum(p_full, p_hi), tl.maximum(p_full, p_lo), \
            tl.minimum(n_slots, p_hi)
    else:
        lo_full, hi_full, lo_tail, hi_tail = 0, p_full, p_full, n_slots
    for start_n in range(lo_full, hi_full, BLOCK_N):
        k = _load_t(pk_base + start_n * stride_pkn, rows_n, offs_d, stride_pkn, stride_pkd, rows_n,
                  HEAD_DIM, BLOCK_D, False)
        v = _load(pv_base + start_n * stride_pvn, rows_n, offs_d, stride_pvn, stride_pvd, rows_n,
                  HEAD_DIM, BLOCK_D, False)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, 0, qk_scale, cap_in, cap_out, seed, b, h, start_m,
                                  start_n + rows_n, drop_thr, False, PRECISION, SOFTCAP, DROPOUT)
    for start_n in range(lo_tail, hi_tail, BLOCK_N):  # the ragged end: at most one block (a loop keeps it compact)
        in_range = start_n + rows_n < n_slots
        k = _load_t(pk_base + start_n * stride_pkn, rows_n, offs_d, stride_pkn, stride_pkd, in_range,
                    HEAD_DIM, BLOCK_D, True)
        v = _load(pv_base + start_n * stride_pvn, rows_n, offs_d, stride_pvn, stride_pvd, in_range,
                  HEAD_DIM, BLOCK_D, True)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, in_range[None, :], qk_scale, cap_in, cap_out, seed, b, h,
                                  start_m, start_n + rows_n, drop_thr, True, PRECISION, SOFTCAP, DROPOUT)

    # text: whole blocks below the diagonal (masked only by padding), then the diagonal blocks and the tail
    k_base = K + b * stride_kb + hk * stride_kh + k_row0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k_row0 * stride_vn
    mask_base = MASK + b * stride_mb
    if SPLIT_KV:  # this item's keys [t_lo, t_hi); every query of the tile sees keys <= DIAG (query 0's last)
        full_hi, _ = _causal_bounds(0, Tk, DIAG, CAUSAL, 1, BLOCK_N)
        lo_full, hi_full, lo_tail, hi_tail = t_lo, tl.minimum(full_hi, t_hi), tl.maximum(full_hi, t_lo), t_hi
        k_base += t_lo.to(tl.int64) * stride_kn
        v_base += t_lo.to(tl.int64) * stride_vn
        mask_base += t_lo.to(tl.int64) * stride_mn
    else:
        full_hi, hi = _causal_bounds(start_m, Tk, DIAG, CAUSAL, BLOCK_M, BLOCK_N)
        lo_full, hi_full, lo_tail, hi_tail = 0, full_hi, full_hi, hi
    for start_n in range(lo_full, hi_full, BLOCK_N):  # running 64-bit pointers: no 32-bit start_n * stride product
        k = _load_t(k_base, rows_n, offs_d, stride_kn, stride_kd, rows_n, HEAD_DIM, BLOCK_D, False)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, rows_n, HEAD_DIM, BLOCK_D, False)
        visible = 0
        if HAS_MASK:
            visible = (tl.load(mask_base + rows_n * stride_mn) != 0)[None, :]
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, visible, qk_scale, cap_in, cap_out, seed, b, h, start_m,
                                  P + start_n + rows_n, drop_thr, HAS_MASK, PRECISION, SOFTCAP, DROPOUT)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn
    for start_n in range(lo_tail, hi_tail, BLOCK_N):
        cols = start_n + rows_n
        in_range = cols < Tk
        k = _load_t(k_base, rows_n, offs_d, stride_kn, stride_kd, in_range, HEAD_DIM, BLOCK_D, True)
        v = _load(v_base, rows_n, offs_d, stride_vn, stride_vd, in_range, HEAD_DIM, BLOCK_D, True)
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= pos_m[:, None] + DIAG)
        if HAS_MASK:
            visible = visible & (tl.load(mask_base + rows_n * stride_mn, mask=in_range, other=0) != 0)[None, :]
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, visible, qk_scale, cap_in, cap_out, seed, b, h, start_m,
                                  P + cols, drop_thr, True, PRECISION, SOFTCAP, DROPOUT)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        mask_base += BLOCK_N * stride_mn

    empty = l_i == 0.0  # saw no key at all: output 0, lse = +inf so backward's p = exp(s - lse) = 0
    l_safe = tl.where(empty, 1.0, l_i)
    if SPLIT_KV:  # float32 partials; a split that saw no key weighs 0 in the merge (base-2 lse -inf)
        o_offs = (slot.to(tl.int64) * BATCH + q_row) * stride_ob + q_head * stride_oh + pos_m * stride_om
        _store(O, o_offs, offs_d, 1, stride_od, acc / l_safe[:, None], m_valid, HEAD_DIM, BLOCK_D)
        l_offs = (slot.to(tl.int64) * BATCH + q_row) * stride_lb + q_head * stride_lh + pos_m
        tl.store(LSE + l_offs, tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe)), mask=m_valid)
    else:
        if DROPOUT:
            out = acc * (drop_scale / l_safe)[:, None]
        else:
            out = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        o_base = O + b * stride_ob + h * stride_oh + (q_row0 + start_m.to(tl.int64)) * stride_om
        _store(o_base, rows_m, offs_d, stride_om, stride_od, out.to(O.dtype.element_ty), m_valid, HEAD_DIM,
               BLOCK_D)
        tl.store(LSE + b * stride_lb + h * stride_lh + q_row0 + pos_m, lse, mask=m_valid)


@triton.jit(do_not_specialize=GENERIC_INTS)
def _prefix_attn_combine_kernel(
    PART_O, PART_L, O, LSE, N_QUERIES, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The merge of SPLIT_KV's partials by log-sum-exp: PART_O [SPLITS, N_QUERIES, HEAD_DIM] float32 (normalised),
    PART_L [SPLITS, N_QUERIES] (base 2, -inf for a split that saw no key) -> O [N_QUERIES, HEAD_DIM] in O's dtype,
    LSE [N_QUERIES] float32 (natural log, +inf for a query that saw no key: output 0). Contiguous, BLOCK_R queries
    a program. Offsets are 64-bit: N_QUERIES * HEAD_DIM may pass 2**31."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok = rows < N_QUERIES
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    part_l = PART_L
    for _ in range(0, SPLITS):
        m = tl.maximum(m, tl.load(part_l + rows, mask=ok, other=float("-inf")))
        part_l += N_QUERIES
    m = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    part_l = PART_L
    part_o = PART_O  # a running pointer: no split * N_QUERIES * HEAD_DIM product
    o_step = N_QUERIES.to(tl.int64) * HEAD_DIM
    for _ in range(0, SPLITS):
        w = tl.math.exp2(tl.load(part_l + rows, mask=ok, other=float("-inf")) - m)
        part = _load(part_o, rows, offs_d, HEAD_DIM, 1, ok, HEAD_DIM, BLOCK_D, True)
        l_sum += w
        acc += w[:, None] * part  # NaN in a split stays NaN, as in plain attention
        part_l += N_QUERIES
        part_o += o_step
    empty = l_sum == 0.0
    l_safe = tl.where(empty, 1.0, l_sum)
    _store(O, rows, offs_d, HEAD_DIM, 1, (acc / l_safe[:, None]).to(O.dtype.element_ty), ok, HEAD_DIM, BLOCK_D)
    tl.store(LSE + rows, tl.where(empty, float("inf"), (m + tl.math.log2(l_safe)) * 0.6931471805599453), mask=ok)


@triton.jit(do_not_specialize=GENERIC_INTS)
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
