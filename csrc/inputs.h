// Argument checks and per-call descriptors of the CPU kernel: shapes (Dims), the per-row prefix entry and
// length (Bank), dropout (Dropout), the padding mask (MaskInfo), dtype dispatch and stride preparation.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "philox.h"

namespace prefix_attn {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

struct Dims {
  int64_t batch, heads_q, len_q, head_dim, heads_kv, len_k, num_prefix, group;
  int64_t entries = 0;  // > 0: the prefix is a bank of this many entries, chosen per row
};

// Which bank entry, and how many of its slots, batch row b sees (the per-row prefix descriptor).
struct Bank {
  std::vector<int64_t> ids, lengths;  // empty: shared prefix / every entry has all num_prefix slots
  int64_t num_prefix = 0;
  int64_t entry(int64_t b) const { return ids.empty() ? 0 : ids[b]; }
  int64_t slots(int64_t b) const { return lengths.empty() ? num_prefix : lengths[entry(b)]; }
};

inline std::vector<int64_t> to_vector(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

inline Bank make_bank(const c10::optional<at::Tensor>& prefix_ids, const c10::optional<at::Tensor>& prefix_lengths,
                      const struct Dims& d) {
  Bank bank;
  bank.num_prefix = d.num_prefix;
  if (prefix_ids.has_value() && prefix_ids->defined()) {
    TORCH_CHECK(d.entries > 0, "prefix_attn cpu: prefix_ids needs a bank prefix [N, heads_kv, P, head_dim]");
    TORCH_CHECK(prefix_ids->dim() == 1 && prefix_ids->size(0) == d.batch, "prefix_attn cpu: prefix_ids must be [batch=",
                d.batch, "], got ", shape_str(*prefix_ids));
    bank.ids = to_vector(*prefix_ids);
    for (int64_t id : bank.ids) {
      TORCH_CHECK(id >= 0 && id < d.entries, "prefix_attn cpu: prefix_ids must be in [0, ", d.entries, "), got ", id);
    }
  } else {
    TORCH_CHECK(d.entries == 0, "prefix_attn cpu: a bank prefix [N, heads_kv, P, head_dim] needs prefix_ids");
  }
  if (prefix_lengths.has_value() && prefix_lengths->defined()) {
    TORCH_CHECK(!bank.ids.empty(), "prefix_attn cpu: prefix_lengths needs prefix_ids");
    TORCH_CHECK(prefix_lengths->dim() == 1 && prefix_lengths->size(0) == d.entries,
                "prefix_attn cpu: prefix_lengths must be [num_entries=", d.entries, "], got ",
                shape_str(*prefix_lengths));
    bank.lengths = to_vector(*prefix_lengths);
    for (int64_t n : bank.lengths) {
      TORCH_CHECK(n >= 0 && n <= d.num_prefix, "prefix_attn cpu: prefix_lengths must be in [0, ", d.num_prefix,
                  "], got ", n);
    }
  }
  return bank;
}

// Packed sequences (cu_seqlens): sequence b is rows [q_start[b], q_start[b] + q_len[b]) of the packed q and
// [k_start[b], ...) of k and v. Padded inputs have no descriptor: every row has the tensor's len_q and len_k.
struct Seqs {
  bool packed = false;
  std::vector<int64_t> q_start, k_start, q_len, k_len;
  int64_t len_q = 0, len_k = 0;  // padded: the lengths of every row; packed: the longest sequences'
  int64_t total_q = 0;           // packed: rows of the packed q
  int64_t lq(int64_t b) const { return packed ? q_len[b] : len_q; }
  int64_t lk(int64_t b) const { return packed ? k_len[b] : len_k; }
  const int64_t* q_rows() const { return packed ? q_start.data() : nullptr; }
  const int64_t* k_rows() const { return packed ? k_start.data() : nullptr; }
  // where row b, query head h starts in lse ([B, Hq, Tq] padded, [Hq, total_q] packed)
  int64_t lse_row(int64_t b, int64_t h, int64_t heads_q) const {
    return packed ? h * total_q + q_start[b] : (b * heads_q + h) * len_q;
  }
};

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// [total, H, D] -> a [1, H, total, D] view (no copy), the layout Rows4 reads with Seqs' row starts
inline at::Tensor packed_view(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }

// The offsets, checked where they guard memory: cu[0] == 0, non-decreasing, ending at the packed totals, and
// len_q <= len_k per sequence (the bottom-right causal alignment).
inline Seqs make_seqs(const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, int64_t total_q,
                      int64_t total_k) {
  Seqs s;
  TORCH_CHECK(given(cu_q) == given(cu_k), "prefix_attn cpu: cu_seqlens_q and cu_seqlens_k go together");
  if (!given(cu_q)) return s;
  TORCH_CHECK(cu_q->dim() == 1 && cu_q->size(0) >= 1 && cu_k->dim() == 1 && cu_k->size(0) == cu_q->size(0),
              "prefix_attn cpu: cu_seqlens_q and cu_seqlens_k must be [num_seqs + 1], got ", shape_str(*cu_q),
              " and ", shape_str(*cu_k));
  TORCH_CHECK(cu_q->device().is_cpu() && cu_k->device().is_cpu(), "prefix_attn cpu: cu_seqlens must be on the CPU");
  TORCH_CHECK((cu_q->scalar_type() == at::kInt || cu_q->scalar_type() == at::kLong) &&
                  (cu_k->scalar_type() == at::kInt || cu_k->scalar_type() == at::kLong),
              "prefix_attn cpu: cu_seqlens must be int32 or int64, got ", cu_q->scalar_type(), " and ",
              cu_k->scalar_type());
  const std::vector<int64_t> oq = to_vector(*cu_q), ok = to_vector(*cu_k);
  TORCH_CHECK(oq[0] == 0 && ok[0] == 0, "prefix_attn cpu: cu_seqlens must start at 0");
  TORCH_CHECK(oq.back() == total_q && ok.back() == total_k, "prefix_attn cpu: cu_seqlens_q/k end at ", oq.back(),
              "/", ok.back(), ", not at the packed totals ", total_q, "/", total_k);
  s.packed = true;
  s.total_q = total_q;
  const size_t n = oq.size() - 1;
  for (size_t b = 0; b < n; ++b) {
    const int64_t lq = oq[b + 1] - oq[b], lk = ok[b + 1] - ok[b];
    TORCH_CHECK(lq >= 0 && lk >= 0, "prefix_attn cpu: cu_seqlens must be non-decreasing");
    TORCH_CHECK(lq <= lk, "prefix_attn cpu: sequence ", b, " has len_q=", lq, " > len_k=", lk);
    s.q_start.push_back(oq[b]);
    s.k_start.push_back(ok[b]);
    s.q_len.push_back(lq);
    s.k_len.push_back(lk);
    s.len_q = std::max(s.len_q, lq);
    s.len_k = std::max(s.len_k, lk);
  }
  return s;
}

inline Dropout make_dropout(double dropout_p, int64_t seed, int64_t batch_offset) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "prefix_attn cpu: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(seed >= 0, "prefix_attn cpu: dropout_seed must be >= 0, got ", seed);
  Dropout dr;
  dr.on = dropout_p > 0;
  dr.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
  dr.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  dr.threshold16 = static_cast<uint32_t>(dropout_p * 65536.0);  // floor(p * 2^16), as dropout.threshold
  dr.scale = dr.on ? 1.0 / (1.0 - dropout_p) : 1.0;
  dr.batch_offset = batch_offset;
  return dr;
}

inline Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v, const c10::optional<at::Tensor>& attention_mask, bool causal) {
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
  // causal queries are the last len_q keys; non-causal ones (cross-attention) may outnumber the keys
  TORCH_CHECK(!causal || d.len_q <= d.len_k, "prefix_attn cpu: causal len_q=", d.len_q, " must be <= len_k=",
              d.len_k);
  TORCH_CHECK((prefix_k.dim() == 3 || prefix_k.dim() == 4) && prefix_k.size(-3) == d.heads_kv &&
                  prefix_k.size(-1) == d.head_dim,
              "prefix_attn cpu: prefix_k must be [heads_kv=", d.heads_kv, ", num_prefix, head_dim=", d.head_dim,
              "] or a bank [N, heads_kv, num_prefix, head_dim], got ", shape_str(prefix_k));
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), "prefix_attn cpu: prefix_v must be ", shape_str(prefix_k),
              " like prefix_k, got ", shape_str(prefix_v));
  d.num_prefix = prefix_k.size(-2);
  d.entries = prefix_k.dim() == 4 ? prefix_k.size(0) : 0;
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

inline at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Run fn(compute, input) with default-constructed values of the compute type (float or double) and of the
// inputs' type: float32 and float64 compute in themselves, bfloat16 and float16 in float.
template <typename Fn>
void dispatch(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kDouble: fn(double(), double()); break;
    case at::kFloat: fn(float(), float()); break;
    case at::kBFloat16: fn(float(), c10::BFloat16()); break;
    case at::kHalf: fn(float(), c10::Half()); break;
    default: TORCH_CHECK(false, "prefix_attn cpu: unsupported dtype ", st);
  }
}

// Make rows unit-stride and non-overlapping; other strides (e.g. a [B, T, H, D] tensor viewed as
// [B, H, T, D]) are kept and handed to BLAS as leading dimensions, without a copy.
inline at::Tensor prep(const at::Tensor& t) {
  at::Tensor x = t;
  const bool rows_ok = x.size(-1) <= 1 || x.stride(-1) == 1;
  const bool ld_ok = x.size(-2) <= 1 || x.stride(-2) >= x.size(-1);
  if (!rows_ok || !ld_ok) x = x.contiguous();
  return x;
}

// Padded inputs as they are, or packed ones ([total, H, D] with cu_seqlens) as [1, H, total, D] views with their
// descriptor; the checks of check_inputs then apply to both, and d's batch and lengths become the number of
// sequences and the longest ones.
struct Layout {
  at::Tensor q, k, v;
  Seqs seqs;
  Dims d;
};

inline Layout make_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                          const at::Tensor& prefix_v, const c10::optional<at::Tensor>& attention_mask,
                          const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k,
                          bool causal) {
  Layout l{q, k, v, Seqs{}, Dims{}};
  if (given(cu_q) || given(cu_k)) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "prefix_attn cpu: packed q, k, v must be [total_q, ",
                "heads_q, head_dim] and [total_k, heads_kv, head_dim], got ", shape_str(q), ", ", shape_str(k), ", ",
                shape_str(v));
    TORCH_CHECK(!given(attention_mask), "prefix_attn cpu: attention_mask must be None with cu_seqlens");
    l.seqs = make_seqs(cu_q, cu_k, q.size(0), k.size(0));
    l.q = packed_view(q);
    l.k = packed_view(k);
    l.v = packed_view(v);
  }
  l.d = check_inputs(l.q, l.k, l.v, prefix_k, prefix_v, attention_mask, causal || given(cu_q));
  if (l.seqs.packed) {
    l.d.batch = static_cast<int64_t>(l.seqs.q_len.size());
    l.d.len_q = l.seqs.len_q;
    l.d.len_k = l.seqs.len_k;
  } else {
    l.seqs.len_q = l.d.len_q;
    l.seqs.len_k = l.d.len_k;
  }
  return l;
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

inline MaskInfo make_mask_info(const c10::optional<at::Tensor>& attention_mask, const Dims& d, at::ScalarType cdt) {
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

}  // namespace prefix_attn
