// Native CPU prefix attention: fused forward and backward (flash-attention style), pybind11 bindings.
//
// Shapes: those of prefix_attention and prefix_attention_varlen (prefix_attn/ops.py, varlen.py). lse is
// [batch, heads_q, len_q] (packed: [heads_q, total_q]), float32 (float64 for float64 inputs), +inf where a query
// sees no key. Packed sequence s (rows cu_seqlens[s] .. cu_seqlens[s + 1]) plays the part of batch row s
// (prefix_ids[s], the dropout row), through a per-row descriptor of starts and lengths (inputs.h: Seqs).
//
// Query i sits at text position len_k - len_q + i (bottom-right alignment) and, with `causal`, sees text
// keys j <= len_k - len_q + i. The keys of one (batch, kv head) are walked as blocks of the prefix, then
// blocks of the text up to the causal diagonal of the query block; blocks above the diagonal and blocks
// that the padding mask hides entirely are never touched.
//
// Forward: parallel over (batch, head_q, query block); online softmax over the key blocks, so the only
// per-thread state is one [block_q, block_k] score tile and one [block_q, head_dim] accumulator.
// Backward: parallel over (batch, head_kv); a task walks the heads_q / heads_kv query heads of its group,
// the key blocks and the query rows that see them in a fixed order, so it owns dK/dV of its (batch, kv head),
// dQ of its query heads and one [P, head_dim] partial of the prefix gradients, which are then summed over
// the batch in batch order. Every sum runs in a fixed order: the gradients are bitwise reproducible.
//
// Tile products go to the BLAS inside libtorch_cpu (MKL in the x86 wheels; gemm.h), the per-score-element
// softmax work is in rowops.h. float16/bfloat16 inputs are computed in float32: each thread converts the rows
// its tasks read into small float buffers and accumulates its gradient rows in float (stage.h), so no whole
// float32 copy of an input or output is made; float64 runs in float64 (for gradcheck).
//
// Attention dropout (dropout_p > 0): each score tile's keep mask is regenerated from (seed, b, h, i, c) by
// Philox (rowops.h, the mask of prefix_attn/dropout.py) in forward and backward; nothing is stored.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <limits>
#include <string>
#include <vector>

#include "gemm.h"
#include "inputs.h"
#include "rowops.h"
#include "stage.h"

namespace prefix_attn {

namespace {

// Tile sizes. Forward: query blocks of kFwdBlockQ rows (small, so that little work is wasted on the causal
// diagonal) against key blocks of kFwdBlockK (large, so that each BLAS call has enough work).
// Backward: key blocks of kBwdBlockK against up to kBwdBlockQ query rows at a time.
constexpr int64_t kFwdBlockQ = 64;
constexpr int64_t kFwdBlockK = 512;
constexpr int64_t kBwdBlockQ = 512;
constexpr int64_t kBwdBlockK = 64;

// 16-bit products take the probabilities and dS rounded to the operand type TM (gemm.h)
template <typename T, typename TM>
constexpr bool kRounds = !std::is_same<T, TM>::value;

// x[0 .. count) as an operand of type TM: itself, or rounded into buf
template <typename T, typename TM>
const TM* operand(const T* x, int64_t count, TM* buf) {
  if constexpr (kRounds<T, TM>) {
    from_float(x, count, 1, count, buf, count);
    return buf;
  } else {
    return x;
  }
}

// ---- forward ----

// T: compute type (float or double); TI: the inputs' and out's type (T, or a 16-bit type computed in float);
// TM: the tile products' operand type (T, or TI for 16-bit products: gemm.h)
template <typename T, typename TI, typename TM>
void prefix_attn_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                            const at::Tensor& pv, const MaskInfo& mask, const Bank& bank, const Seqs& seqs,
                            const Dropout& drop, const Dims& d, bool causal, double scale, double softcap,
                            const at::Tensor& out, at::Tensor& lse, int64_t block_q, int64_t block_k) {
  const int64_t nqb = (d.len_q + block_q - 1) / block_q;
  const int64_t D = d.head_dim;
  const Rows4<TI> Q(q, seqs.q_rows()), K(k, seqs.k_rows()), V(v, seqs.k_rows()), PK(pk), PV(pv);
  const Rows4<TI> O(out, seqs.q_rows());  // out: q's layout, contiguous
  T* lse_ptr = lse.data_ptr<T>();  // contiguous [B, Hq, Tq] (packed [Hq, total_q])
  const T* bias_ptr = mask.present ? mask.bias.data_ptr<T>() : nullptr;
  const T sc = static_cast<T>(scale);
  const T cap = static_cast<T>(softcap);  // 0: no capping

  at::parallel_for(0, d.batch * d.heads_q * nqb, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    std::vector<T> s_buf(block_q * block_k), acc(block_q * D), m(block_q), l(block_q);
    std::vector<uint32_t> rnd(drop.on ? 4 * block_k : 0);  // dropout scratch
    std::vector<TM> p_op(kRounds<T, TM> ? block_q * block_k : 0);  // P rounded to TM
    RowSource<TM, TI> qs(Q, d.len_q, D), ks(K, d.len_k, D), vs(V, d.len_k, D), pks(PK, d.num_prefix, D),
        pvs(PV, d.num_prefix, D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb;
      const int64_t hq = (task / nqb) % d.heads_q;
      const int64_t b = task / (nqb * d.heads_q);
      const int64_t hkv = hq / d.group;
      const int64_t q0 = qb * block_q;
      const int64_t len_q = seqs.lq(b), len_k = seqs.lk(b), offset = len_k - len_q;
      if (q0 >= len_q) continue;  // a packed sequence shorter than the longest
      const int64_t bq = std::min(block_q, len_q - q0);
      int64_t ldq, ldk, ldv;
      const TM* q_tile = qs.rows(b, hq, q0, q0 + bq, &ldq);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));

      // S = Q K^T; online softmax (l sums the probabilities before dropout); acc += dropout(P) V.
      // col0: the block's first column in the dropout numbering (prefix slots, then num_prefix + text key)
      auto block = [&](const TM* k_tile, int64_t ldk, const TM* v_tile, int64_t ldv, int64_t n, const T* col_bias,
                       int64_t lim0, int64_t col0) {
        T* S = s_buf.data();
        tile_mm(false, true, bq, n, D, T(1), q_tile, ldq, k_tile, ldk, T(0), S, n);
        if (cap > T(0)) softcap_tile<T>(S, bq * n, sc, cap, nullptr);
        fwd_rows(S, bq, n, sc, col_bias, lim0, m.data(), l.data(), acc.data(), D);
        if (drop.on) dropout_tile(S, bq, n, drop, b, hq, q0, col0, rnd.data(), /*multiply=*/true);
        tile_mm(false, false, bq, D, n, T(1), operand(S, bq * n, p_op.data()), n, v_tile, ldv, T(1), acc.data(), D);
      };

      const int64_t e = bank.entry(b), np = bank.slots(b);
      for (int64_t p0 = 0; p0 < np; p0 += block_k) {
        const int64_t n = std::min(block_k, np - p0);
        const TM* k_tile = pks.rows(e, hkv, p0, p0 + n, &ldk);
        const TM* v_tile = pvs.rows(e, hkv, p0, p0 + n, &ldv);
        block(k_tile, ldk, v_tile, ldv, n, nullptr, n, p0);
      }
      const int64_t k_begin = mask.present ? mask.first[b] : 0;
      const int64_t k_end = causal ? std::min(len_k, offset + q0 + bq) : len_k;
      for (int64_t k0 = k_begin; k0 < k_end; k0 += block_k) {
        const int64_t n = std::min(block_k, k_end - k0);
        if (mask.present && mask.block_empty(b, k0, n)) continue;
        const int64_t lim0 = causal ? offset + q0 + 1 - k0 : n;
        const TM* k_tile = ks.rows(b, hkv, k0, k0 + n, &ldk);
        const TM* v_tile = vs.rows(b, hkv, k0, k0 + n, &ldv);
        block(k_tile, ldk, v_tile, ldv, n,
              mask.present ? bias_ptr + b * d.len_k + k0 : nullptr, lim0, d.num_prefix + k0);
      }

      T* lse_q = lse_ptr + seqs.lse_row(b, hq, d.heads_q) + q0;
      for (int64_t r = 0; r < bq; ++r) {
        TI* o = O.mut(b, hq, q0 + r);
        const T* a = acc.data() + r * D;
        if (!(l[r] == T(0))) {  // NaN too: a diverged input gives a NaN output and lse, as in plain attention
          const T inv = T(1) / l[r];
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<TI>(a[c] * inv);
          lse_q[r] = m[r] + std::log(l[r]);
        } else {  // sees no key at all: zero output, lse = +inf makes backward's exp(s - lse) vanish
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<TI>(T(0));
          lse_q[r] = std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

// ---- backward ----

template <typename T, typename TI, typename TM>
void prefix_attn_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& out, const at::Tensor& lse,
                            const MaskInfo& mask, const Bank& bank, const Seqs& seqs, const Dropout& drop,
                            const Dims& d, bool causal, double scale, double softcap, bool need_dq, bool need_dkv,
                            bool need_dprefix, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                            at::Tensor& dpk_part, at::Tensor& dpv_part, int64_t block_q, int64_t block_k) {
  const int64_t D = d.head_dim;
  const int64_t* qr = seqs.q_rows();
  const int64_t* kr = seqs.k_rows();
  const Rows4<TI> Q(q, qr), K(k, kr), V(v, kr), PK(pk), PV(pv), dO(dout, qr), O(out, qr);
  // outputs: in q's / k's layout, contiguous, each element owned by exactly one task (zero-filled when TI == T,
  // see RowSink)
  const bool do_dq = need_dq, do_dkv = need_dkv;
  const Rows4<TI> DQ(do_dq ? dq : q, qr), DK(do_dkv ? dk : k, kr), DV(do_dkv ? dv : v, kr);
  // prefix-gradient partials: T, zero-filled
  T* dpk_ptr = need_dprefix && d.num_prefix > 0 ? dpk_part.data_ptr<T>() : nullptr;      // [B, Hkv, P, D]
  T* dpv_ptr = need_dprefix && d.num_prefix > 0 ? dpv_part.data_ptr<T>() : nullptr;
  const T* lse_ptr = lse.data_ptr<T>();  // contiguous [B, Hq, Tq] (packed [Hq, total_q])
  const T* bias_ptr = mask.present ? mask.bias.data_ptr<T>() : nullptr;
  const bool do_prefix = d.num_prefix > 0 && (need_dq || need_dprefix);
  const bool do_text = need_dq || need_dkv;
  const T sc = static_cast<T>(scale);
  const T cap = static_cast<T>(softcap);  // 0: no capping

  at::parallel_for(0, d.batch * d.heads_kv, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    std::vector<T> s_buf(block_q * block_k), dp_buf(block_q * block_k), delta(d.len_q);
    std::vector<T> cap_grad(cap > T(0) ? block_q * block_k : 0);  // 1 - tanh^2 of the capped scores
    std::vector<T> z_buf(drop.on ? block_q * block_k : 0);         // dropout: 0 or 1 / (1 - p) per score
    std::vector<uint32_t> rnd(drop.on ? 4 * block_k : 0);
    std::vector<TM> p_op(kRounds<T, TM> ? block_q * block_k : 0), ds_op(p_op.size());  // P and dS rounded to TM
    RowSource<TM, TI> qs(Q, d.len_q, D), dos(dO, d.len_q, D), os(O, d.len_q, D), ks(K, d.len_k, D),
        vs(V, d.len_k, D), pks(PK, d.num_prefix, D), pvs(PV, d.num_prefix, D);
    RowSink<T, TI> dq_sink(d.len_q, D), dk_sink(d.len_k, D), dv_sink(d.len_k, D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.heads_kv;
      const int64_t hkv = task % d.heads_kv;
      const int64_t len_q = seqs.lq(b), len_k = seqs.lk(b), offset = len_k - len_q;
      if (len_q == 0) continue;  // no query: zero gradients (packed outputs are zero-filled, padded ones have none)
      int64_t lddk = D, lddv = D, lddq = D;
      T* dk_bh = do_dkv ? dk_sink.begin(DK.mut(b, hkv, 0), len_k, DK.st, &lddk) : nullptr;
      T* dv_bh = do_dkv ? dv_sink.begin(DV.mut(b, hkv, 0), len_k, DV.st, &lddv) : nullptr;
      T* dpk_bh = dpk_ptr ? dpk_ptr + (b * d.heads_kv + hkv) * d.num_prefix * D : nullptr;
      T* dpv_bh = dpv_ptr ? dpv_ptr + (b * d.heads_kv + hkv) * d.num_prefix * D : nullptr;
      // this row's prefix entry and its visible slots, and the text keys from the first visible one
      const int64_t e = bank.entry(b), np = bank.slots(b);
      const int64_t k_begin = mask.present ? mask.first[b] : 0;
      int64_t ldpk = 0, ldpv = 0, ldk = 0, ldv = 0;
      const TM* pk_rows = do_prefix ? pks.rows(e, hkv, 0, np, &ldpk) : nullptr;  // row p at pk_rows + p * ldpk
      const TM* pv_rows = do_prefix ? pvs.rows(e, hkv, 0, np, &ldpv) : nullptr;
      const TM* k_rows = do_text ? ks.rows(b, hkv, k_begin, len_k, &ldk) - k_begin * ldk : nullptr;  // row j at
      const TM* v_rows = do_text ? vs.rows(b, hkv, k_begin, len_k, &ldv) - k_begin * ldv : nullptr;  // + j * ld
      for (int64_t g = 0; g < d.group; ++g) {
        const int64_t hq = hkv * d.group + g;
        int64_t ldq, lddo, ldo;
        const TM* q_h = qs.rows(b, hq, 0, len_q, &ldq);
        const TM* do_h = dos.rows(b, hq, 0, len_q, &lddo);
        const TM* o_h = os.rows(b, hq, 0, len_q, &ldo);
        row_dots(do_h, lddo, o_h, ldo, len_q, D, delta.data());
        const T* lse_h = lse_ptr + seqs.lse_row(b, hq, d.heads_q);
        T* dq_h = do_dq ? dq_sink.begin(DQ.mut(b, hq, 0), len_q, DQ.st, &lddq) : nullptr;

        // Key block [n keys] x query rows [r0, r0 + m): P and dS from the recomputed scores, then the three
        // gradient products. Key-block-outer order makes every product long in its inner dimension: dK and
        // dV sum over up to block_q rows in one call, dQ takes the whole block of keys.
        // With dropout (mask Z, scaled): dV = (P * Z)^T dO and dS = P * (Z * dP - delta), delta = rowsum(dO * O).
        // dk_tile / dv_tile: rows ldc_dk / ldc_dv apart (the prefix partials: D; the text gradients: their sinks')
        auto block = [&](const TM* k_tile, int64_t ldk, const TM* v_tile, int64_t ldv, T* dk_tile, T* dv_tile,
                         int64_t ldc_dk, int64_t ldc_dv, int64_t n, const T* col_bias, int64_t r0, int64_t m,
                         int64_t lim0, int64_t col0) {
          T* S = s_buf.data();
          T* dS = dp_buf.data();
          const TM* q_tile = q_h + r0 * ldq;
          const TM* do_tile = do_h + r0 * lddo;
          tile_mm(false, true, m, n, D, T(1), q_tile, ldq, k_tile, ldk, T(0), S, n);
          tile_mm(false, true, m, n, D, T(1), do_tile, lddo, v_tile, ldv, T(0), dS, n);
          if (cap > T(0)) softcap_tile<T>(S, m * n, sc, cap, cap_grad.data());
          if (drop.on) dropout_tile(z_buf.data(), m, n, drop, b, hq, r0, col0, rnd.data(), /*multiply=*/false);
          bwd_rows(S, dS, m, n, sc, col_bias, lim0, lse_h + r0, delta.data() + r0, drop.on ? z_buf.data() : nullptr);
          if (cap > T(0)) {
            const T* g = cap_grad.data();
            for (int64_t i = 0; i < m * n; ++i) dS[i] *= g[i];
          }
          const TM* P_op = dv_tile ? operand(S, m * n, p_op.data()) : nullptr;
          const TM* dS_op = dk_tile || dq_h ? operand(dS, m * n, ds_op.data()) : nullptr;
          if (dv_tile) tile_mm(true, false, n, D, m, T(1), P_op, n, do_tile, lddo, T(1), dv_tile, ldc_dv);
          if (dk_tile) tile_mm(true, false, n, D, m, sc, dS_op, n, q_tile, ldq, T(1), dk_tile, ldc_dk);
          if (dq_h) tile_mm(false, false, m, D, n, sc, dS_op, n, k_tile, ldk, T(1), dq_h + r0 * lddq, lddq);
        };

        if (do_prefix) {  // the partial's slots past np stay zero
          // equal blocks of at most block_k slots (P = 200: 4 x 50, not 3 x 64 + 8)
          const int64_t nblocks = (np + block_k - 1) / block_k;
          const int64_t pb = nblocks > 0 ? (np + nblocks - 1) / nblocks : 1;
          for (int64_t p0 = 0; p0 < np; p0 += pb) {
            const int64_t n = std::min(pb, np - p0);
            for (int64_t r0 = 0; r0 < len_q; r0 += block_q) {
              block(pk_rows + p0 * ldpk, ldpk, pv_rows + p0 * ldpv, ldpv, dpk_bh ? dpk_bh + p0 * D : nullptr,
                    dpv_bh ? dpv_bh + p0 * D : nullptr, D, D, n, nullptr, r0, std::min(block_q, len_q - r0), n, p0);
            }
          }
        }
        if (do_text) {
          for (int64_t k0 = k_begin; k0 < len_k; k0 += block_k) {
            const int64_t n = std::min(block_k, len_k - k0);
            if (mask.present && mask.block_empty(b, k0, n)) continue;
            // with `causal`, query rows before k0 - offset see none of these keys
            const int64_t r_begin = causal ? std::max<int64_t>(0, k0 - offset) : 0;
            for (int64_t r0 = r_begin; r0 < len_q; r0 += block_q) {
              const int64_t m = std::min(block_q, len_q - r0);
              block(k_rows + k0 * ldk, ldk, v_rows + k0 * ldv, ldv, dk_bh ? dk_bh + k0 * lddk : nullptr,
                    dv_bh ? dv_bh + k0 * lddv : nullptr, lddk, lddv, n,
                    mask.present ? bias_ptr + b * d.len_k + k0 : nullptr, r0, m, causal ? offset + r0 + 1 - k0 : n,
                    d.num_prefix + k0);
            }
          }
        }
        dq_sink.flush();
      }
      dk_sink.flush();
      dv_sink.flush();
    }
  });
}

// fn(TM()) with the operand type of the tile products: TI for 16-bit inputs that take 16-bit products, else T
template <typename T, typename TI, typename Fn>
void with_operands(Fn&& fn) {
  if constexpr (!std::is_same<T, TI>::value) {
    if (use_products16<TI>()) {
      fn(TI());
      return;
    }
  }
  fn(T());
}

// ---- launchers bound to Python ----

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                            const at::Tensor& prefix_v, const c10::optional<at::Tensor>& attention_mask, bool causal,
                            double softmax_scale, double softcap, int64_t block_q, int64_t block_k,
                            const c10::optional<at::Tensor>& prefix_ids,
                            const c10::optional<at::Tensor>& prefix_lengths, double dropout_p, int64_t dropout_seed,
                            int64_t dropout_batch_offset, const c10::optional<at::Tensor>& cu_seqlens_q,
                            const c10::optional<at::Tensor>& cu_seqlens_k) {
  at::NoGradGuard no_grad;
  const Layout lay = make_layout(q, k, v, prefix_k, prefix_v, attention_mask, cu_seqlens_q, cu_seqlens_k, causal);
  const Dims& d = lay.d;
  const Bank bank = make_bank(prefix_ids, prefix_lengths, d);
  const Dropout drop = make_dropout(dropout_p, dropout_seed, dropout_batch_offset);
  TORCH_CHECK(block_q > 0 && block_k > 0, "prefix_attn cpu: block sizes must be positive");
  TORCH_CHECK(softcap >= 0, "prefix_attn cpu: softcap must be >= 0, got ", softcap);
  const auto st = q.scalar_type();
  const auto cdt = compute_type(st);
  at::Tensor qc = prep(lay.q), kc = prep(lay.k), vc = prep(lay.v), pkc = prep(prefix_k), pvc = prep(prefix_v);
  const MaskInfo mask = make_mask_info(attention_mask, d, cdt);
  const bool packed = lay.seqs.packed;
  // out in q's layout ([B, Hq, Tq, D], packed [total_q, Hq, D]), contiguous; lse [B, Hq, Tq] (packed [Hq, total_q])
  at::Tensor out = packed ? at::zeros(q.sizes(), q.options())
                          : at::empty({d.batch, d.heads_q, d.len_q, d.head_dim}, q.options());
  at::Tensor lse = packed ? at::full({d.heads_q, q.size(0)}, std::numeric_limits<double>::infinity(),
                                     at::TensorOptions().dtype(cdt))
                          : at::empty({d.batch, d.heads_q, d.len_q}, at::TensorOptions().dtype(cdt));
  if (out.numel() > 0 && d.batch > 0) {
    const at::Tensor out4 = packed ? packed_view(out) : out;
    dispatch(st, [&](auto compute, auto input) {
      using T = decltype(compute);
      using TI = decltype(input);
      with_operands<T, TI>([&](auto operand_type) {
        prefix_attn_fwd_kernel<T, TI, decltype(operand_type)>(qc, kc, vc, pkc, pvc, mask, bank, lay.seqs, drop, d,
                                                              causal, softmax_scale, softcap, out4, lse, block_q,
                                                              block_k);
      });
    });
  }
  return {out, lse};
}

std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                            const c10::optional<at::Tensor>& attention_mask, const at::Tensor& out,
                            const at::Tensor& lse, bool causal, double softmax_scale, double softcap, bool need_dq,
                            bool need_dkv, bool need_dprefix, int64_t block_q, int64_t block_k,
                            const c10::optional<at::Tensor>& prefix_ids,
                            const c10::optional<at::Tensor>& prefix_lengths, double dropout_p, int64_t dropout_seed,
                            int64_t dropout_batch_offset, const c10::optional<at::Tensor>& cu_seqlens_q,
                            const c10::optional<at::Tensor>& cu_seqlens_k) {
  at::NoGradGuard no_grad;
  const Layout lay = make_layout(q, k, v, prefix_k, prefix_v, attention_mask, cu_seqlens_q, cu_seqlens_k, causal);
  const Dims& d = lay.d;
  const bool packed = lay.seqs.packed;
  const Bank bank = make_bank(prefix_ids, prefix_lengths, d);
  const Dropout drop = make_dropout(dropout_p, dropout_seed, dropout_batch_offset);
  TORCH_CHECK(block_q > 0 && block_k > 0, "prefix_attn cpu: block sizes must be positive");
  TORCH_CHECK(dout.sizes() == q.sizes(), "prefix_attn cpu: dout must be ", shape_str(q), " like q, got ",
              shape_str(dout));
  TORCH_CHECK(out.sizes() == q.sizes(), "prefix_attn cpu: out must be ", shape_str(q), " like q, got ",
              shape_str(out));
  if (packed) {
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == d.heads_q && lse.size(1) == q.size(0),
                "prefix_attn cpu: lse must be [heads_q=", d.heads_q, ", total_q=", q.size(0), "], got ",
                shape_str(lse));
  } else {
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.batch && lse.size(1) == d.heads_q && lse.size(2) == d.len_q,
                "prefix_attn cpu: lse must be [batch=", d.batch, ", heads_q=", d.heads_q, ", len_q=", d.len_q,
                "], got ", shape_str(lse));
  }
  TORCH_CHECK(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "prefix_attn cpu: dout, out and lse must be CPU tensors");
  const auto st = q.scalar_type();
  const auto cdt = compute_type(st);
  TORCH_CHECK(dout.scalar_type() == st && out.scalar_type() == st, "prefix_attn cpu: dout and out must have q's dtype ",
              st, ", got ", dout.scalar_type(), " and ", out.scalar_type());
  at::Tensor qc = prep(lay.q), kc = prep(lay.k), vc = prep(lay.v), pkc = prep(prefix_k), pvc = prep(prefix_v),
             doc = prep(packed ? packed_view(dout) : dout), oc = prep(packed ? packed_view(out) : out);
  at::Tensor lsec = lse.to(cdt).contiguous();
  const MaskInfo mask = make_mask_info(attention_mask, d, cdt);
  auto opts = at::TensorOptions().dtype(cdt);
  // dq/dk/dv in q's dtype. float32/float64 accumulate in place (zero-filled); 16-bit ones are written whole by
  // the tasks' RowSinks whenever the kernel runs.
  // Packed ones are zero-filled: a sequence with no query skips its task, leaving its keys' rows zero.
  const bool written = st != cdt && q.numel() > 0 && !packed;
  auto grad = [&](at::IntArrayRef shape) {
    return written ? at::empty(shape, q.options()) : at::zeros(shape, q.options());
  };
  at::Tensor dq, dk, dv, dpk_part, dpv_part;
  if (need_dq) dq = grad(q.sizes());
  if (need_dkv) {
    dk = grad(k.sizes());
    dv = grad(k.sizes());
  }
  if (need_dprefix) {
    dpk_part = at::zeros({d.batch, d.heads_kv, d.num_prefix, d.head_dim}, opts);
    dpv_part = at::zeros({d.batch, d.heads_kv, d.num_prefix, d.head_dim}, opts);
  }
  if (q.numel() > 0 && d.batch > 0 && (need_dq || need_dkv || need_dprefix)) {
    auto view = [&](const at::Tensor& t) { return packed && t.defined() ? packed_view(t) : t; };
    const at::Tensor dq4 = view(dq), dk4 = view(dk), dv4 = view(dv);
    dispatch(st, [&](auto compute, auto input) {
      using T = decltype(compute);
      using TI = decltype(input);
      with_operands<T, TI>([&](auto operand_type) {
        prefix_attn_bwd_kernel<T, TI, decltype(operand_type)>(doc, qc, kc, vc, pkc, pvc, oc, lsec, mask, bank,
                                                              lay.seqs, drop, d, causal, softmax_scale, softcap,
                                                              need_dq, need_dkv, need_dprefix, dq4, dk4, dv4,
                                                              dpk_part, dpv_part, block_q, block_k);
      });
    });
  }
  at::Tensor dpk, dpv;
  if (need_dprefix && d.entries > 0) {
    // A bank: entry n's gradient is the sum of the partials of the rows that chose it, in batch order
    // (deterministic); entries no row chose stay zero.
    dpk = at::zeros({d.entries, d.heads_kv, d.num_prefix, d.head_dim}, opts);
    dpv = at::zeros({d.entries, d.heads_kv, d.num_prefix, d.head_dim}, opts);
    for (int64_t b = 0; b < d.batch; ++b) {
      dpk.select(0, bank.entry(b)).add_(dpk_part.select(0, b));
      dpv.select(0, bank.entry(b)).add_(dpv_part.select(0, b));
    }
  } else if (need_dprefix) {
    // Sum the per-row partials over the batch, in batch order (deterministic).
    // An empty batch has no partials: its prefix gradients are zeros.
    dpk = d.batch > 0 ? dpk_part.select(0, 0).clone() : at::zeros({d.heads_kv, d.num_prefix, d.head_dim}, opts);
    dpv = d.batch > 0 ? dpv_part.select(0, 0).clone() : at::zeros({d.heads_kv, d.num_prefix, d.head_dim}, opts);
    for (int64_t b = 1; b < d.batch; ++b) {
      dpk.add_(dpk_part.select(0, b));
      dpv.add_(dpv_part.select(0, b));
    }
  }
  auto cast = [&](const at::Tensor& t) { return (!t.defined() || t.scalar_type() == st) ? t : t.to(st); };
  return {cast(dq), cast(dk), cast(dv), cast(dpk), cast(dpv)};
}

}  // namespace
}  // namespace prefix_attn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def(
      "gemm_backend", []() { return std::string(prefix_attn::blas().use ? "blas" : "aten"); },
      "where the tile products run: 'blas' (sgemm_/dgemm_ of libtorch_cpu) or 'aten' (at::mm on tile views)");
  m.def(
      "set_gemm_backend",
      [](const std::string& name) {
        TORCH_CHECK(name == "blas" || name == "aten", "gemm backend must be 'blas' or 'aten', got '", name, "'");
        auto& b = prefix_attn::blas();
        TORCH_CHECK(name == "aten" || (b.sgemm && b.dgemm), "no sgemm_/dgemm_ found in libtorch_cpu");
        b.use = name == "blas";
      },
      "choose 'blas' or 'aten' for the tile products (for tests; not thread-safe against running kernels)");
  m.def(
      "tile_products",
      [](const std::string& dtype) {
        TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "dtype must be 'bfloat16' or 'float16', got '", dtype,
                    "'");
        const bool low = dtype == "bfloat16" ? prefix_attn::use_products16<c10::BFloat16>()
                                             : prefix_attn::use_products16<c10::Half>();
        return std::string(low ? dtype : "float32");
      },
      "the operand type of the tile products for inputs of this 16-bit dtype: the dtype itself (16-bit products "
      "with float32 accumulation) or 'float32' (rows converted)");
  m.def(
      "set_tile_products",
      [](const std::string& mode) {
        using prefix_attn::Products16;
        TORCH_CHECK(mode == "auto" || mode == "float32" || mode == "16-bit",
                    "tile products must be 'auto', 'float32' or '16-bit', got '", mode, "'");
        TORCH_CHECK(mode != "16-bit" || (prefix_attn::products16_available<c10::BFloat16>() &&
                                         prefix_attn::products16_available<c10::Half>()),
                    "no cblas_gemm_bf16bf16f32/cblas_gemm_f16f16f32 found in libtorch_cpu");
        prefix_attn::products16_mode() =
            mode == "auto" ? Products16::kAuto : (mode == "float32" ? Products16::kFloat32 : Products16::k16Bit);
      },
      "16-bit inputs: 'auto' (16-bit products where the CPU has matrix units for the dtype: AMX-BF16, AMX-FP16), "
      "'float32' or '16-bit' (for tests and benchmarks; not thread-safe against running kernels)");
  m.def(
      "philox_isa", []() { return prefix_attn::philox_isa(); },
      "which Philox implementation the dropout mask uses: 'avx512', 'avx2' or 'scalar'");
  m.def(
      "set_philox_isa",
      [](const std::string& name) {
        TORCH_CHECK(name == "avx512" || name == "avx2" || name == "scalar",
                    "philox isa must be 'avx512', 'avx2' or 'scalar', got '", name, "'");
#ifdef PREFIX_ATTN_X86_SIMD
        const bool has = name == "scalar" || (name == "avx512" ? __builtin_cpu_supports("avx512f")
                                                                : __builtin_cpu_supports("avx2"));
        TORCH_CHECK(has, "this CPU has no ", name);
#else
        TORCH_CHECK(name == "scalar", "no SIMD Philox on this platform");
#endif
        prefix_attn::philox_isa() = name;
      },
      "choose the Philox implementation (for tests; not thread-safe against running kernels)");
  m.doc() = "prefix_attn native CPU kernels: fused prefix attention forward and backward";
  m.def("fwd", &prefix_attn::fwd,
        "prefix attention forward -> [out, lse]; lse float32 (float64 for float64 inputs), +inf where a query "
        "sees no key",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("attention_mask"), py::arg("causal"), py::arg("softmax_scale"), py::arg("softcap") = 0.0,
        py::arg("block_q") = prefix_attn::kFwdBlockQ, py::arg("block_k") = prefix_attn::kFwdBlockK,
        py::arg("prefix_ids") = py::none(), py::arg("prefix_lengths") = py::none(), py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = 0, py::arg("dropout_batch_offset") = 0, py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none());
  m.def("bwd", &prefix_attn::bwd,
        "prefix attention backward -> [dq, dk, dv, dprefix_k, dprefix_v] (None where not needed)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("attention_mask"), py::arg("out"), py::arg("lse"), py::arg("causal"), py::arg("softmax_scale"),
        py::arg("softcap") = 0.0, py::arg("need_dq") = true, py::arg("need_dkv") = true, py::arg("need_dprefix") = true,
        py::arg("block_q") = prefix_attn::kBwdBlockQ, py::arg("block_k") = prefix_attn::kBwdBlockK,
        py::arg("prefix_ids") = py::none(), py::arg("prefix_lengths") = py::none(), py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = 0, py::arg("dropout_batch_offset") = 0, py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none());
}
