// Native CPU prefix attention: fused forward and backward (flash-attention style), pybind11 bindings.
//
// Shapes (as in prefix_attn/ops.py):
//   q:              [batch, heads_q,  len_q, head_dim]
//   k, v:           [batch, heads_kv, len_k, head_dim]     heads_q % heads_kv == 0, len_q <= len_k
//   prefix_k/v:     [heads_kv, P, head_dim]                read in place for every batch row, P may be 0
//   attention_mask: [batch, len_k] bool                    1 = text key visible (prefix always visible)
//   out:            [batch, heads_q, len_q, head_dim]
//   lse:            [batch, heads_q, len_q]                float32 (float64 for float64 inputs), +inf where a
//                                                          query sees no key
//
// Query i sits at text position len_k - len_q + i (bottom-right alignment) and, with `causal`, sees text
// keys j <= len_k - len_q + i. The keys of one (batch, kv head) are walked as blocks of the prefix, then
// blocks of the text up to the causal diagonal of the query block; blocks above the diagonal and blocks
// that the padding mask hides entirely are never touched.
//
// Forward: parallel over (batch, head_q, query block); online softmax over the key blocks, so the only
// per-thread state is one [block_q, block_k] score tile and one [block_q, head_dim] accumulator.
// Backward: parallel over (batch, head_kv); a task walks the heads_q / heads_kv query heads of its group,
// their query blocks and the visible key blocks in a fixed order, so it owns dK/dV of its (batch, kv head),
// dQ of its query heads and one [P, head_dim] partial of the prefix gradients, which are then summed over
// the batch in batch order. Every sum runs in a fixed order: the gradients are bitwise reproducible.
//
// Matrix products go through ATen (at::mm_out / addmm_ on tile views: MKL or oneDNN underneath); the
// per-score-element softmax work is in rowops.h. float16/bfloat16 inputs are converted to float32 once
// (explicit copies of q, k, v, the prefix and, in backward, dout and out), computed in float32 and the
// results converted back; float64 runs in float64 (for gradcheck).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "rowops.h"

namespace prefix_attn {

// ---- multiversioned row operations (declared in rowops.h) ----

PREFIX_ATTN_CLONES void fwd_rows(float* S, int64_t rows, int64_t n, float scale, const float* col_bias,
                                 int64_t lim0, float* m, float* l, float* acc, int64_t dim) {
  fwd_rows_impl<float>(S, rows, n, scale, col_bias, lim0, m, l, acc, dim);
}
void fwd_rows(double* S, int64_t rows, int64_t n, double scale, const double* col_bias, int64_t lim0, double* m,
              double* l, double* acc, int64_t dim) {
  fwd_rows_impl<double>(S, rows, n, scale, col_bias, lim0, m, l, acc, dim);
}
PREFIX_ATTN_CLONES void bwd_rows(float* S, float* dP, int64_t rows, int64_t n, float scale, const float* col_bias,
                                 int64_t lim0, const float* lse, const float* delta) {
  bwd_rows_impl<float>(S, dP, rows, n, scale, col_bias, lim0, lse, delta);
}
void bwd_rows(double* S, double* dP, int64_t rows, int64_t n, double scale, const double* col_bias, int64_t lim0,
              const double* lse, const double* delta) {
  bwd_rows_impl<double>(S, dP, rows, n, scale, col_bias, lim0, lse, delta);
}
PREFIX_ATTN_CLONES void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows,
                                 int64_t dim, float* res) {
  row_dots_impl<float>(a, lda, b, ldb, rows, dim, res);
}
void row_dots(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t rows, int64_t dim,
              double* res) {
  row_dots_impl<double>(a, lda, b, ldb, rows, dim, res);
}

namespace {

// Tile sizes. block_k is large so that each BLAS call has enough work to hide its fixed cost; the
// forward query block is small so that the work wasted on the causal diagonal stays small.
constexpr int64_t kFwdBlockQ = 64;
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBlockK = 512;

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

struct Dims {
  int64_t batch, heads_q, len_q, head_dim, heads_kv, len_k, num_prefix, group;
};

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v, const c10::optional<at::Tensor>& attention_mask) {
  TORCH_CHECK(q.dim() == 4, "prefix_attn cpu: q must be [batch, heads_q, len_q, head_dim], got ", shape_str(q));
  Dims d{};
  d.batch = q.size(0);
  d.heads_q = q.size(1);
  d.len_q = q.size(2);
  d.head_dim = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == d.batch && k.size(3) == d.head_dim,
              "prefix_attn cpu: k must be [batch=", d.batch, ", heads_kv, len_k, head_dim=", d.head_dim, "], got ",
              shape_str(k));
  d.heads_kv = k.size(1);
  d.len_k = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), "prefix_attn cpu: v must be [batch, heads_kv, len_k, head_dim] = ",
              shape_str(k), " like k, got ", shape_str(v));
  TORCH_CHECK(d.heads_kv > 0 && d.heads_q % d.heads_kv == 0, "prefix_attn cpu: heads_q=", d.heads_q,
              " must be a multiple of heads_kv=", d.heads_kv);
  TORCH_CHECK(d.len_q <= d.len_k, "prefix_attn cpu: len_q=", d.len_q, " must be <= len_k=", d.len_k);
  TORCH_CHECK(prefix_k.dim() == 3 && prefix_k.size(0) == d.heads_kv && prefix_k.size(2) == d.head_dim,
              "prefix_attn cpu: prefix_k must be [heads_kv=", d.heads_kv, ", num_prefix, head_dim=", d.head_dim,
              "], got ", shape_str(prefix_k));
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), "prefix_attn cpu: prefix_v must be ", shape_str(prefix_k),
              " like prefix_k, got ", shape_str(prefix_v));
  d.num_prefix = prefix_k.size(1);
  d.group = d.heads_q / d.heads_kv;
  const char* names[] = {"q", "k", "v", "prefix_k", "prefix_v"};
  const at::Tensor* ts[] = {&q, &k, &v, &prefix_k, &prefix_v};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK(ts[i]->device().is_cpu(), "prefix_attn cpu: ", names[i], " must be a CPU tensor, got ",
                ts[i]->device());
    TORCH_CHECK(ts[i]->scalar_type() == q.scalar_type(), "prefix_attn cpu: ", names[i], " has dtype ",
                ts[i]->scalar_type(), " but q has ", q.scalar_type());
  }
  auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "prefix_attn cpu: dtype must be float32, float64, bfloat16 or float16, got ", st);
  if (attention_mask.has_value() && attention_mask->defined()) {
    const auto& m = *attention_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "prefix_attn cpu: attention_mask must be bool, got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == d.batch && m.size(1) == d.len_k,
                "prefix_attn cpu: attention_mask must be [batch=", d.batch, ", len_k=", d.len_k, "], got ",
                shape_str(m));
    TORCH_CHECK(m.device().is_cpu(), "prefix_attn cpu: attention_mask must be a CPU tensor");
  }
  return d;
}

at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Convert to the compute dtype (a copy only for float16/bfloat16) and make rows unit-stride; other
// strides (e.g. a [B, T, H, D] tensor viewed as [B, H, T, D]) are kept and handed to BLAS as leading dims.
at::Tensor prep(const at::Tensor& t, at::ScalarType cdt) {
  at::Tensor x = t.scalar_type() == cdt ? t : t.to(cdt);
  if (x.size(-1) > 1 && x.stride(-1) != 1) x = x.contiguous();
  return x;
}

// Padding mask, preprocessed: a 0/-inf bias per text key, the first visible key of each row and a running
// count of visible keys (to skip key blocks the mask hides entirely).
struct MaskInfo {
  bool present = false;
  at::Tensor bias;                 // [B, Tk] compute dtype, contiguous
  std::vector<int64_t> first;      // [B]
  std::vector<int64_t> count;      // [B, Tk + 1]: visible keys in [0, j)
  int64_t len_k = 0;

  bool block_empty(int64_t b, int64_t k0, int64_t n) const {
    const int64_t* c = count.data() + b * (len_k + 1);
    return c[k0 + n] - c[k0] == 0;
  }
};

MaskInfo make_mask_info(const c10::optional<at::Tensor>& attention_mask, const Dims& d, at::ScalarType cdt) {
  MaskInfo info;
  info.len_k = d.len_k;
  if (!attention_mask.has_value() || !attention_mask->defined()) return info;
  info.present = true;
  at::Tensor m = attention_mask->contiguous();
  info.bias = at::zeros({d.batch, d.len_k}, at::TensorOptions().dtype(cdt))
                  .masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
  info.first.assign(d.batch, d.len_k);
  info.count.assign(d.batch * (d.len_k + 1), 0);
  const bool* mp = m.data_ptr<bool>();
  for (int64_t b = 0; b < d.batch; ++b) {
    int64_t* c = info.count.data() + b * (d.len_k + 1);
    for (int64_t j = 0; j < d.len_k; ++j) {
      bool vis = mp[b * d.len_k + j];
      c[j + 1] = c[j] + (vis ? 1 : 0);
      if (vis && info.first[b] == d.len_k) info.first[b] = j;
    }
  }
  return info;
}

// ---- forward ----

template <typename T>
void prefix_attn_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                            const at::Tensor& pv, const MaskInfo& mask, const Dims& d, bool causal, double scale,
                            at::Tensor& out, at::Tensor& lse, int64_t block_q, int64_t block_k) {
  const int64_t nqb = (d.len_q + block_q - 1) / block_q;
  const int64_t offset = d.len_k - d.len_q;
  const int64_t D = d.head_dim;
  T* out_ptr = out.data_ptr<T>();  // contiguous [B, Hq, Tq, D]
  T* lse_ptr = lse.data_ptr<T>();  // contiguous [B, Hq, Tq]
  const T* bias_ptr = mask.present ? mask.bias.data_ptr<T>() : nullptr;

  at::parallel_for(0, d.batch * d.heads_q * nqb, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    auto opts = q.options();
    at::Tensor s_buf = at::empty({block_q * block_k}, opts);
    at::Tensor acc_buf = at::empty({block_q * D}, opts);
    std::vector<T> m(block_q), l(block_q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb;
      const int64_t hq = (task / nqb) % d.heads_q;
      const int64_t b = task / (nqb * d.heads_q);
      const int64_t hkv = hq / d.group;
      const int64_t q0 = qb * block_q;
      const int64_t bq = std::min(block_q, d.len_q - q0);
      at::Tensor Q = q.select(0, b).select(0, hq).narrow(0, q0, bq);
      at::Tensor acc = acc_buf.narrow(0, 0, bq * D).view({bq, D});
      acc.zero_();
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));

      auto block = [&](const at::Tensor& K, const at::Tensor& V, const T* col_bias, int64_t lim0) {
        const int64_t n = K.size(0);
        at::Tensor S = s_buf.narrow(0, 0, bq * n).view({bq, n});
        at::mm_out(S, Q, K.t());
        fwd_rows(S.data_ptr<T>(), bq, n, static_cast<T>(scale), col_bias, lim0, m.data(), l.data(),
                 acc.data_ptr<T>(), D);
        acc.addmm_(S, V);
      };

      if (d.num_prefix > 0) {
        at::Tensor PK = pk.select(0, hkv), PV = pv.select(0, hkv);
        for (int64_t p0 = 0; p0 < d.num_prefix; p0 += block_k) {
          const int64_t n = std::min(block_k, d.num_prefix - p0);
          block(PK.narrow(0, p0, n), PV.narrow(0, p0, n), nullptr, n);
        }
      }
      const int64_t k_begin = mask.present ? mask.first[b] : 0;
      const int64_t k_end = causal ? std::min(d.len_k, offset + q0 + bq) : d.len_k;
      if (k_begin < k_end) {
        at::Tensor K = k.select(0, b).select(0, hkv), V = v.select(0, b).select(0, hkv);
        for (int64_t k0 = k_begin; k0 < k_end; k0 += block_k) {
          const int64_t n = std::min(block_k, k_end - k0);
          if (mask.present && mask.block_empty(b, k0, n)) continue;
          const int64_t lim0 = causal ? offset + q0 + 1 - k0 : n;
          block(K.narrow(0, k0, n), V.narrow(0, k0, n), mask.present ? bias_ptr + b * d.len_k + k0 : nullptr, lim0);
        }
      }

      const T* a = acc.data_ptr<T>();
      const int64_t row0 = (b * d.heads_q + hq) * d.len_q + q0;
      for (int64_t r = 0; r < bq; ++r) {
        T* o = out_ptr + (row0 + r) * D;
        if (l[r] > T(0)) {
          const T inv = T(1) / l[r];
          for (int64_t c = 0; c < D; ++c) o[c] = a[r * D + c] * inv;
          lse_ptr[row0 + r] = m[r] + std::log(l[r]);
        } else {  // sees no key at all: zero output, lse = +inf makes backward's exp(s - lse) vanish
          for (int64_t c = 0; c < D; ++c) o[c] = T(0);
          lse_ptr[row0 + r] = std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

// ---- backward ----

template <typename T>
void prefix_attn_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& out, const at::Tensor& lse,
                            const MaskInfo& mask, const Dims& d, bool causal, double scale, bool need_dq,
                            bool need_dkv, bool need_dprefix, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                            at::Tensor& dpk_part, at::Tensor& dpv_part, int64_t block_q, int64_t block_k) {
  const int64_t nqb = (d.len_q + block_q - 1) / block_q;
  const int64_t offset = d.len_k - d.len_q;
  const int64_t D = d.head_dim;
  const T* lse_ptr = lse.data_ptr<T>();  // contiguous [B, Hq, Tq]
  const T* bias_ptr = mask.present ? mask.bias.data_ptr<T>() : nullptr;
  const bool do_prefix = d.num_prefix > 0 && (need_dq || need_dprefix);
  const bool do_text = need_dq || need_dkv;

  at::parallel_for(0, d.batch * d.heads_kv, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    auto opts = q.options();
    at::Tensor s_buf = at::empty({block_q * block_k}, opts);
    at::Tensor dp_buf = at::empty({block_q * block_k}, opts);
    std::vector<T> delta(block_q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.heads_kv;
      const int64_t hkv = task % d.heads_kv;
      at::Tensor K = k.select(0, b).select(0, hkv), V = v.select(0, b).select(0, hkv);
      at::Tensor dK, dV, dPK, dPV;
      if (need_dkv) {
        dK = dk.select(0, b).select(0, hkv);
        dV = dv.select(0, b).select(0, hkv);
      }
      at::Tensor PK, PV;
      if (d.num_prefix > 0) {
        PK = pk.select(0, hkv);
        PV = pv.select(0, hkv);
        if (need_dprefix) {
          dPK = dpk_part.select(0, b).select(0, hkv);
          dPV = dpv_part.select(0, b).select(0, hkv);
        }
      }
      for (int64_t g = 0; g < d.group; ++g) {
        const int64_t hq = hkv * d.group + g;
        at::Tensor Qh = q.select(0, b).select(0, hq), dOh = dout.select(0, b).select(0, hq);
        at::Tensor Oh = out.select(0, b).select(0, hq);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t q0 = qb * block_q;
          const int64_t bq = std::min(block_q, d.len_q - q0);
          at::Tensor Q = Qh.narrow(0, q0, bq), dO = dOh.narrow(0, q0, bq), O = Oh.narrow(0, q0, bq);
          row_dots(dO.data_ptr<T>(), dO.stride(0), O.data_ptr<T>(), O.stride(0), bq, D, delta.data());
          const T* lse_rows = lse_ptr + (b * d.heads_q + hq) * d.len_q + q0;
          at::Tensor dQ;
          if (need_dq) dQ = dq.select(0, b).select(0, hq).narrow(0, q0, bq);

          // One key block: P and dS from the recomputed scores, then the three gradient products.
          auto block = [&](const at::Tensor& Kb, const at::Tensor& Vb, at::Tensor dKb, at::Tensor dVb,
                           const T* col_bias, int64_t lim0) {
            const int64_t n = Kb.size(0);
            at::Tensor S = s_buf.narrow(0, 0, bq * n).view({bq, n});
            at::Tensor dS = dp_buf.narrow(0, 0, bq * n).view({bq, n});
            at::mm_out(S, Q, Kb.t());
            at::mm_out(dS, dO, Vb.t());
            bwd_rows(S.data_ptr<T>(), dS.data_ptr<T>(), bq, n, static_cast<T>(scale), col_bias, lim0, lse_rows,
                     delta.data());
            if (dVb.defined()) dVb.addmm_(S.t(), dO);
            if (dKb.defined()) dKb.addmm_(dS.t(), Q, 1, scale);
            if (need_dq) dQ.addmm_(dS, Kb, 1, scale);
          };

          if (do_prefix) {
            for (int64_t p0 = 0; p0 < d.num_prefix; p0 += block_k) {
              const int64_t n = std::min(block_k, d.num_prefix - p0);
              block(PK.narrow(0, p0, n), PV.narrow(0, p0, n), need_dprefix ? dPK.narrow(0, p0, n) : at::Tensor(),
                    need_dprefix ? dPV.narrow(0, p0, n) : at::Tensor(), nullptr, n);
            }
          }
          if (do_text) {
            const int64_t k_begin = mask.present ? mask.first[b] : 0;
            const int64_t k_end = causal ? std::min(d.len_k, offset + q0 + bq) : d.len_k;
            for (int64_t k0 = k_begin; k0 < k_end; k0 += block_k) {
              const int64_t n = std::min(block_k, k_end - k0);
              if (mask.present && mask.block_empty(b, k0, n)) continue;
              const int64_t lim0 = causal ? offset + q0 + 1 - k0 : n;
              block(K.narrow(0, k0, n), V.narrow(0, k0, n), need_dkv ? dK.narrow(0, k0, n) : at::Tensor(),
                    need_dkv ? dV.narrow(0, k0, n) : at::Tensor(),
                    mask.present ? bias_ptr + b * d.len_k + k0 : nullptr, lim0);
            }
          }
        }
      }
    }
  });
}

// ---- launchers bound to Python ----

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                            const at::Tensor& prefix_v, const c10::optional<at::Tensor>& attention_mask, bool causal,
                            double softmax_scale, int64_t block_q, int64_t block_k) {
  at::NoGradGuard no_grad;
  const Dims d = check_inputs(q, k, v, prefix_k, prefix_v, attention_mask);
  TORCH_CHECK(block_q > 0 && block_k > 0, "prefix_attn cpu: block sizes must be positive");
  const auto st = q.scalar_type();
  const auto cdt = compute_type(st);
  at::Tensor qc = prep(q, cdt), kc = prep(k, cdt), vc = prep(v, cdt), pkc = prep(prefix_k, cdt),
             pvc = prep(prefix_v, cdt);
  const MaskInfo mask = make_mask_info(attention_mask, d, cdt);
  auto opts = at::TensorOptions().dtype(cdt);
  at::Tensor out = at::empty({d.batch, d.heads_q, d.len_q, d.head_dim}, opts);
  at::Tensor lse = at::empty({d.batch, d.heads_q, d.len_q}, opts);
  if (out.numel() > 0) {
    if (cdt == at::kDouble) {
      prefix_attn_fwd_kernel<double>(qc, kc, vc, pkc, pvc, mask, d, causal, softmax_scale, out, lse, block_q, block_k);
    } else {
      prefix_attn_fwd_kernel<float>(qc, kc, vc, pkc, pvc, mask, d, causal, softmax_scale, out, lse, block_q, block_k);
    }
  }
  return {out.scalar_type() == st ? out : out.to(st), lse};
}

std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                            const c10::optional<at::Tensor>& attention_mask, const at::Tensor& out,
                            const at::Tensor& lse, bool causal, double softmax_scale, bool need_dq, bool need_dkv,
                            bool need_dprefix, int64_t block_q, int64_t block_k) {
  at::NoGradGuard no_grad;
  const Dims d = check_inputs(q, k, v, prefix_k, prefix_v, attention_mask);
  TORCH_CHECK(block_q > 0 && block_k > 0, "prefix_attn cpu: block sizes must be positive");
  TORCH_CHECK(dout.sizes() == q.sizes(), "prefix_attn cpu: dout must be [batch, heads_q, len_q, head_dim] = ",
              shape_str(q), " like q, got ", shape_str(dout));
  TORCH_CHECK(out.sizes() == q.sizes(), "prefix_attn cpu: out must be [batch, heads_q, len_q, head_dim] = ",
              shape_str(q), " like q, got ", shape_str(out));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.batch && lse.size(1) == d.heads_q && lse.size(2) == d.len_q,
              "prefix_attn cpu: lse must be [batch=", d.batch, ", heads_q=", d.heads_q, ", len_q=", d.len_q,
              "], got ", shape_str(lse));
  TORCH_CHECK(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "prefix_attn cpu: dout, out and lse must be CPU tensors");
  const auto st = q.scalar_type();
  const auto cdt = compute_type(st);
  at::Tensor qc = prep(q, cdt), kc = prep(k, cdt), vc = prep(v, cdt), pkc = prep(prefix_k, cdt),
             pvc = prep(prefix_v, cdt), doc = prep(dout, cdt), oc = prep(out, cdt);
  at::Tensor lsec = lse.to(cdt).contiguous();
  const MaskInfo mask = make_mask_info(attention_mask, d, cdt);
  auto opts = at::TensorOptions().dtype(cdt);
  at::Tensor dq, dk, dv, dpk_part, dpv_part;
  if (need_dq) dq = at::zeros({d.batch, d.heads_q, d.len_q, d.head_dim}, opts);
  if (need_dkv) {
    dk = at::zeros({d.batch, d.heads_kv, d.len_k, d.head_dim}, opts);
    dv = at::zeros({d.batch, d.heads_kv, d.len_k, d.head_dim}, opts);
  }
  if (need_dprefix) {
    dpk_part = at::zeros({d.batch, d.heads_kv, d.num_prefix, d.head_dim}, opts);
    dpv_part = at::zeros({d.batch, d.heads_kv, d.num_prefix, d.head_dim}, opts);
  }
  if (q.numel() > 0 && (need_dq || need_dkv || need_dprefix)) {
    if (cdt == at::kDouble) {
      prefix_attn_bwd_kernel<double>(doc, qc, kc, vc, pkc, pvc, oc, lsec, mask, d, causal, softmax_scale, need_dq,
                                     need_dkv, need_dprefix, dq, dk, dv, dpk_part, dpv_part, block_q, block_k);
    } else {
      prefix_attn_bwd_kernel<float>(doc, qc, kc, vc, pkc, pvc, oc, lsec, mask, d, causal, softmax_scale, need_dq,
                                    need_dkv, need_dprefix, dq, dk, dv, dpk_part, dpv_part, block_q, block_k);
    }
  }
  at::Tensor dpk, dpv;
  if (need_dprefix) {
    // Sum the per-row partials over the batch, in batch order (deterministic).
    dpk = dpk_part.select(0, 0).clone();
    dpv = dpv_part.select(0, 0).clone();
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
  m.doc() = "prefix_attn native CPU kernels: fused prefix attention forward and backward";
  m.def("fwd", &prefix_attn::fwd,
        "prefix attention forward -> [out, lse]; lse float32 (float64 for float64 inputs), +inf where a query "
        "sees no key",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("attention_mask"), py::arg("causal"), py::arg("softmax_scale"),
        py::arg("block_q") = prefix_attn::kFwdBlockQ, py::arg("block_k") = prefix_attn::kBlockK);
  m.def("bwd", &prefix_attn::bwd,
        "prefix attention backward -> [dq, dk, dv, dprefix_k, dprefix_v] (None where not needed)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("attention_mask"), py::arg("out"), py::arg("lse"), py::arg("causal"), py::arg("softmax_scale"),
        py::arg("need_dq") = true, py::arg("need_dkv") = true, py::arg("need_dprefix") = true,
        py::arg("block_q") = prefix_attn::kBwdBlockQ, py::arg("block_k") = prefix_attn::kBlockK);
}
