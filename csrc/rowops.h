// Row-wise softmax pieces of the CPU kernel, one fused pass over a score tile each.
//
// The matrix products run in ATen's CPU BLAS (MKL / oneDNN); what remains per score element is an
// exp, a max, a sum and a few multiplies. The float passes are written on 16-lane vectors (below) and
// compiled three times (x86-64 baseline, AVX2+FMA, AVX-512) with GCC/Clang function multiversioning:
// the loader picks the widest the CPU supports, so the binary is not tied to the build machine's -march.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attrs.h"
#include "philox.h"

namespace prefix_attn {

// exp(x) in float, relative error ~2 ulp, exactly 0 for x < -87.3 (so -inf gives 0).
// Cephes' polynomial after the usual 2^n range reduction, branch-free. Only ever called on x <= ~0 (scores
// minus their running max or their log-sum-exp).
//
// exp_core: for xc already clamped to [-87.34, 88], exp(xc) = y * 2^n; returns y and sets n (an integer value).
// V is float or the kLanes-lane vfl below: the same operations in the same order, so both give the same bits.
template <typename V>
PREFIX_ATTN_INLINE V exp_core(V xc, V& n) {
  const V t = xc * 1.44269504088896341f;
  n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  V f = xc - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  V y = f * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  return y * f * f + f + 1.0f;
}

PREFIX_ATTN_INLINE float exp_approx(float x) {
  const float lo = -87.33654f;
  float xc = x < lo ? lo : x;
  xc = xc > 88.0f ? 88.0f : xc;
  float n;
  const float y = exp_core(xc, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  const float r = y * pow2;
  return x < lo ? 0.0f : r;
}

PREFIX_ATTN_INLINE double exp_approx(double x) { return std::exp(x); }

// ---- kLanes-float vectors (GCC/Clang vector extensions) ----
//
// The float row passes are written on 16-float vectors rather than left to the auto-vectoriser: GCC does not
// if-convert the exp polynomial inside these loops in every build (with torch's headers and flags it emitted
// a scalar loop with a branch per element, half of the kernel time on an AMD EPYC). Vector extensions lower to
// SSE in the default clone, AVX2 in x86-64-v3 and AVX-512 in x86-64-v4 (16 lanes: one zmm register). Row
// tails are padded through a small stack buffer, so every element goes through the same arithmetic.
#if defined(__GNUC__) || defined(__clang__)
#define PREFIX_ATTN_VEC 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always-inlined helpers: no 64-byte vectors cross a real call
constexpr int64_t kLanes = 16;
typedef float vfl __attribute__((vector_size(4 * kLanes)));
typedef int32_t vil __attribute__((vector_size(4 * kLanes)));

PREFIX_ATTN_INLINE vfl vfl_set(float x) { return vfl{} + x; }
// load `count` (<= kLanes) floats from p, the rest of the lanes `fill`
PREFIX_ATTN_INLINE vfl vfl_load(const float* p, int64_t count, float fill) {
  vfl v;
  if (count >= kLanes) {
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = fill;
  std::memcpy(buf, p, static_cast<size_t>(count) * sizeof(float));
  std::memcpy(&v, buf, sizeof(v));
  return v;
}
PREFIX_ATTN_INLINE void vfl_store(float* p, vfl v, int64_t count) {
  if (count >= kLanes) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, static_cast<size_t>(count) * sizeof(float));
  }
}
// lane-wise mask ? a : b (mask lanes all ones or all zeros, as comparisons give)
PREFIX_ATTN_INLINE vfl vfl_select(vil mask, vfl a, vfl b) {
  return reinterpret_cast<vfl>((mask & reinterpret_cast<vil>(a)) | (~mask & reinterpret_cast<vil>(b)));
}
// NaN-propagating maxima (a plain a > b ? a : b drops a NaN b): a diverged score must reach the row's max, the
// output and lse, as in plain attention
PREFIX_ATTN_INLINE float vfl_hmax(vfl v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}
// a fixed tree: lanes i and i + w added, w = kLanes / 2, ..., 1
PREFIX_ATTN_INLINE float vfl_hsum(vfl v) {
  float buf[kLanes];
  std::memcpy(buf, &v, sizeof(buf));
  for (int64_t w = kLanes / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) buf[i] += buf[i + w];
  }
  return buf[0];
}
PREFIX_ATTN_INLINE vfl vfl_max(vfl a, vfl b) { return vfl_select((a > b) | (a != a), a, b); }

// exp_approx on kLanes lanes
PREFIX_ATTN_INLINE vfl exp_lanes(vfl x) {
  const vfl lo = vfl_set(-87.33654f), hi = vfl_set(88.0f);
  vfl xc = vfl_select(x < lo, lo, x);
  xc = vfl_select(xc > hi, hi, xc);
  vfl n;
  const vfl y = exp_core(xc, n);
  const vil bits = (__builtin_convertvector(n, vil) + 127) << 23;
  const vfl r = y * reinterpret_cast<vfl>(bits);
  return vfl_select(x < lo, vfl_set(0.0f), r);
}
#pragma GCC diagnostic pop
#endif

// Forward, one kv block: for each row r of S [rows, n] (raw q.k products), mask, scale, fold into the
// running max m[r] / sum l[r], overwrite S with the unnormalised probabilities and rescale the output
// accumulator acc[r, :dim] by exp(m_old - m_new).
//   col_bias: 0 or -inf per column (padding mask), or nullptr
//   lim0:     row r sees columns c < lim0 + r (causal diagonal); pass n or more for "all"
// Per row: (1) scale (+ bias) and max, (2) exp and sum; they return the row's new max / sum.
template <typename T>
PREFIX_ATTN_INLINE T fwd_scale_max(T* s, int64_t lim, T scale, const T* col_bias) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < lim; ++c) {
    T x = s[c] * scale + (col_bias != nullptr ? col_bias[c] : T(0));
    s[c] = x;
    mx = (x > mx || x != x) ? x : mx;  // NaN propagates
  }
  return mx;
}
template <typename T>
PREFIX_ATTN_INLINE T fwd_exp_sum(T* s, int64_t lim, T m_new) {
  T sum = T(0);
  for (int64_t c = 0; c < lim; ++c) {
    T p = exp_approx(s[c] - m_new);
    s[c] = p;
    sum += p;
  }
  return sum;
}
#ifdef PREFIX_ATTN_VEC
PREFIX_ATTN_INLINE float fwd_scale_max(float* s, int64_t lim, float scale, const float* col_bias) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vfl mx = vfl_set(neg_inf);
  vfl lane{};
  for (int i = 0; i < kLanes; ++i) lane[i] = static_cast<float>(i);
  for (int64_t c = 0; c < lim; c += kLanes) {
    const int64_t k = lim - c;
    // the tail's lanes are -inf after the scale, whatever its sign (-inf * a negative scale would be +inf)
    vfl x = vfl_load(s + c, k, 0.0f) * scale;
    if (col_bias != nullptr) x += vfl_load(col_bias + c, k, 0.0f);
    vfl_store(s + c, x, k);
    if (k < kLanes) x = vfl_select(lane < static_cast<float>(k), x, vfl_set(neg_inf));
    mx = vfl_max(mx, x);
  }
  return vfl_hmax(mx);
}
PREFIX_ATTN_INLINE float fwd_exp_sum(float* s, int64_t lim, float m_new) {
  vfl sum = vfl_set(0.0f);
  for (int64_t c = 0; c < lim; c += kLanes) {
    const int64_t k = lim - c;
    const vfl p = exp_lanes(vfl_load(s + c, k, -std::numeric_limits<float>::infinity()) - m_new);
    vfl_store(s + c, p, k);
    sum += p;
  }
  return vfl_hsum(sum);
}
#endif

template <typename T>
PREFIX_ATTN_INLINE void fwd_rows_impl(T* S, int64_t rows, int64_t n, T scale, const T* col_bias, int64_t lim0,
                                      T* m, T* l, T* acc, int64_t dim) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * n;
    int64_t lim = lim0 + r;
    lim = lim < 0 ? 0 : (lim > n ? n : lim);
    const T mx = fwd_scale_max(s, lim, scale, col_bias);
    for (int64_t c = lim; c < n; ++c) s[c] = T(0);
    T m_new = (m[r] > mx || m[r] != m[r]) ? m[r] : mx;  // NaN propagates
    if (m_new == neg_inf) {  // nothing visible yet: acc and l are still 0
      for (int64_t c = 0; c < lim; ++c) s[c] = T(0);
      continue;
    }
    T alpha = exp_approx(m[r] - m_new);
    const T sum = fwd_exp_sum(s, lim, m_new);
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    if (alpha != T(1)) {
      T* a = acc + r * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] *= alpha;
    }
  }
}

// Backward, one kv block: S [rows, n] (raw q.k) becomes P = softmax probabilities (exp(s*scale - lse)),
// dP [rows, n] (dout.v) becomes dS = P * (dP - delta[r]) (the softmax scale is applied by the caller).
// With a dropout tile Z [rows, n] (0 or 1 / (1 - p)): S becomes P * Z (for dV) and dS = P * (Z * dP - delta[r]).
template <typename T>
PREFIX_ATTN_INLINE void bwd_row(T* s, T* dp, const T* z, int64_t lim, T scale, const T* col_bias, T lr, T dr) {
  for (int64_t c = 0; c < lim; ++c) {
    T x = s[c] * scale - lr;
    if (col_bias != nullptr) x += col_bias[c];
    const T p = exp_approx(x);
    if (z != nullptr) {
      s[c] = p * z[c];
      dp[c] = p * (dp[c] * z[c] - dr);
    } else {
      s[c] = p;
      dp[c] = p * (dp[c] - dr);
    }
  }
}
#ifdef PREFIX_ATTN_VEC
PREFIX_ATTN_INLINE void bwd_row(float* s, float* dp, const float* z, int64_t lim, float scale,
                                const float* col_bias, float lr, float dr) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < lim; c += kLanes) {
    const int64_t k = lim - c;
    vfl x = vfl_load(s + c, k, neg_inf) * scale - lr;  // tail lanes are never stored, whatever their value
    if (col_bias != nullptr) x += vfl_load(col_bias + c, k, 0.0f);
    const vfl p = exp_lanes(x);
    const vfl d = vfl_load(dp + c, k, 0.0f);
    if (z != nullptr) {
      const vfl zz = vfl_load(z + c, k, 0.0f);
      vfl_store(s + c, p * zz, k);
      vfl_store(dp + c, p * (d * zz - dr), k);
    } else {
      vfl_store(s + c, p, k);
      vfl_store(dp + c, p * (d - dr), k);
    }
  }
}
#endif

template <typename T>
PREFIX_ATTN_INLINE void bwd_rows_impl(T* S, T* dP, int64_t rows, int64_t n, T scale, const T* col_bias,
                                      int64_t lim0, const T* lse, const T* delta, const T* Z) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * n;
    T* dp = dP + r * n;
    const T* z = Z != nullptr ? Z + r * n : nullptr;
    int64_t lim = lim0 + r;
    lim = lim < 0 ? 0 : (lim > n ? n : lim);
    bwd_row(s, dp, z, lim, scale, col_bias, lse[r], delta[r]);
    for (int64_t c = lim; c < n; ++c) {
      s[c] = T(0);
      dp[c] = T(0);
    }
  }
}

// Logit softcapping, applied to a raw q.k tile S [count] before fwd_rows / bwd_rows (which multiply by `scale`):
// S -> (cap / scale) * tanh(S * scale / cap), so that scale * S is the capped score cap * tanh(score / cap).
// With `grad` (backward), grad[i] = 1 - tanh^2, the factor dS picks up through the cap.
template <typename T>
inline void softcap_tile(T* S, int64_t count, T scale, T cap, T* grad) {
  const T in = scale / cap;
  const T out = scale != T(0) ? cap / scale : T(0);  // a zero scale: every capped score is 0
  for (int64_t i = 0; i < count; ++i) {
    const T t = std::tanh(S[i] * in);
    S[i] = t * out;
    if (grad != nullptr) grad[i] = T(1) - t * t;
  }
}

// delta[r] = sum_d dout[r, d] * out[r, d] (rows strided by ld_*), in T; TI: the rows' type (T, or 16-bit read as T)
template <typename T, typename TI = T>
PREFIX_ATTN_INLINE void row_dots_impl(const TI* a, int64_t lda, const TI* b, int64_t ldb, int64_t rows, int64_t dim,
                                      T* res) {
  for (int64_t r = 0; r < rows; ++r) {
    const TI* x = a + r * lda;
    const TI* y = b + r * ldb;
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < dim; ++d) sum += static_cast<T>(x[d]) * static_cast<T>(y[d]);
    res[r] = sum;
  }
}

// ---- attention dropout (the mask of prefix_attn/dropout.py, Philox in philox.h) ----

// For a [rows, n] tile at queries row0.., columns col0..: z[r * n + c] = keep ? scale : 0, or, with `multiply`,
// z[r * n + c] *= (keep ? scale : 0). One Philox call decides eight queries of a column; `rnd` is scratch of at
// least 4 * n words.
template <typename T>
PREFIX_ATTN_INLINE void dropout_tile_impl(T* z, int64_t rows, int64_t n, const Dropout& dr, int64_t b, int64_t h,
                                          int64_t row0, int64_t col0, uint32_t* rnd, bool multiply) {
  const uint32_t cb = static_cast<uint32_t>(b + dr.batch_offset), ch = static_cast<uint32_t>(h);
  const uint32_t thr = dr.threshold16;
  const T sc = static_cast<T>(dr.scale);
  for (int64_t g = row0 / 8; 8 * g < row0 + rows; ++g) {
    philox_columns(rnd, n, static_cast<uint32_t>(col0), static_cast<uint32_t>(g), ch, cb, dr.key0, dr.key1);
    for (int64_t k = 0; k < 8; ++k) {
      const int64_t r = 8 * g + k - row0;
      if (r < 0 || r >= rows) continue;
      T* zr = z + r * n;
      const uint32_t* word = rnd + (k / 2) * n;
      const int shift = (k % 2) * 16;
      if (multiply) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) zr[c] *= ((word[c] >> shift) & 0xFFFFu) >= thr ? sc : T(0);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) zr[c] = ((word[c] >> shift) & 0xFFFFu) >= thr ? sc : T(0);
      }
    }
  }
}

// The multiversioned float entry points (defined in tile_ops.cpp) and their double twins.
void fwd_rows(float* S, int64_t rows, int64_t n, float scale, const float* col_bias, int64_t lim0, float* m,
              float* l, float* acc, int64_t dim);
void fwd_rows(double* S, int64_t rows, int64_t n, double scale, const double* col_bias, int64_t lim0, double* m,
              double* l, double* acc, int64_t dim);
void bwd_rows(float* S, float* dP, int64_t rows, int64_t n, float scale, const float* col_bias, int64_t lim0,
              const float* lse, const float* delta, const float* Z);
void bwd_rows(double* S, double* dP, int64_t rows, int64_t n, double scale, const double* col_bias, int64_t lim0,
              const double* lse, const double* delta, const double* Z);
void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t dim, float* res);
void dropout_tile(float* z, int64_t rows, int64_t n, const Dropout& dr, int64_t b, int64_t h, int64_t row0,
                  int64_t col0, uint32_t* rnd, bool multiply);
void dropout_tile(double* z, int64_t rows, int64_t n, const Dropout& dr, int64_t b, int64_t h, int64_t row0,
                  int64_t col0, uint32_t* rnd, bool multiply);
void row_dots(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t rows, int64_t dim, double* res);
void row_dots(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, int64_t rows, int64_t dim,
              float* res);
void row_dots(const c10::Half* a, int64_t lda, const c10::Half* b, int64_t ldb, int64_t rows, int64_t dim,
              float* res);

}  // namespace prefix_attn
