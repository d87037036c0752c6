// The multiversioned entry points of the CPU kernel's per-tile work (declared in rowops.h, gemm.h and stage.h):
// the softmax row passes, the small tile products, the dropout tiles and the 16-bit <-> float conversions, each
// compiled for the x86-64 baseline, AVX2 and AVX-512 (attrs.h), the widest the CPU supports picked at load.

#include <torch/extension.h>

#include <ATen/cpu/Utils.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "gemm.h"
#include "rowops.h"
#include "stage.h"

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
                                 int64_t lim0, const float* lse, const float* delta, const float* Z) {
  bwd_rows_impl<float>(S, dP, rows, n, scale, col_bias, lim0, lse, delta, Z);
}
void bwd_rows(double* S, double* dP, int64_t rows, int64_t n, double scale, const double* col_bias, int64_t lim0,
              const double* lse, const double* delta, const double* Z) {
  bwd_rows_impl<double>(S, dP, rows, n, scale, col_bias, lim0, lse, delta, Z);
}
PREFIX_ATTN_CLONES void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows,
                                 int64_t dim, float* res) {
  row_dots_impl<float>(a, lda, b, ldb, rows, dim, res);
}
void row_dots(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t rows, int64_t dim,
              double* res) {
  row_dots_impl<double>(a, lda, b, ldb, rows, dim, res);
}
PREFIX_ATTN_CLONES void dropout_tile(float* z, int64_t rows, int64_t n, const Dropout& dr, int64_t b, int64_t h,
                                     int64_t row0, int64_t col0, uint32_t* rnd, bool multiply) {
  dropout_tile_impl<float>(z, rows, n, dr, b, h, row0, col0, rnd, multiply);
}
void dropout_tile(double* z, int64_t rows, int64_t n, const Dropout& dr, int64_t b, int64_t h, int64_t row0,
                  int64_t col0, uint32_t* rnd, bool multiply) {
  dropout_tile_impl<double>(z, rows, n, dr, b, h, row0, col0, rnd, multiply);
}

// ---- multiversioned small tile products (declared in gemm.h) ----

PREFIX_ATTN_CLONES void small_gemm(bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  small_gemm_impl<float>(trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void small_gemm(bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  small_gemm_impl<double>(trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// ---- 16-bit <-> float rows (declared in stage.h) ----

PREFIX_ATTN_CLONES void to_float(const c10::BFloat16* src, int64_t ld_src, int64_t rows, int64_t dim, float* dst,
                                 int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {  // bfloat16 is the high half of a float: a shift, exact
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src + r * ld_src);
    uint32_t* o = reinterpret_cast<uint32_t*>(dst + r * ld_dst);
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) o[c] = static_cast<uint32_t>(s[c]) << 16;
  }
}
PREFIX_ATTN_CLONES void to_float(const c10::Half* src, int64_t ld_src, int64_t rows, int64_t dim, float* dst,
                                 int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const c10::Half* s = src + r * ld_src;
    float* o = dst + r * ld_dst;
    for (int64_t c = 0; c < dim; ++c) o[c] = static_cast<float>(s[c]);
  }
}
// round to nearest even, as Tensor.to() (c10::BFloat16's rounding, NaN to 0x7FC0), on the bits
PREFIX_ATTN_CLONES void from_float(const float* src, int64_t ld_src, int64_t rows, int64_t dim, c10::BFloat16* dst,
                                   int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src + r * ld_src);
    uint16_t* o = reinterpret_cast<uint16_t*>(dst + r * ld_dst);
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) {
      const uint32_t x = s[c];
      const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
      o[c] = static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
    }
  }
}
void from_float(const float* src, int64_t ld_src, int64_t rows, int64_t dim, c10::Half* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < dim; ++c) dst[r * ld_dst + c] = c10::Half(src[r * ld_src + c]);
  }
}

PREFIX_ATTN_CLONES void row_dots(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                                 int64_t rows, int64_t dim, float* res) {
  row_dots_impl<float>(a, lda, b, ldb, rows, dim, res);
}
PREFIX_ATTN_CLONES void row_dots(const c10::Half* a, int64_t lda, const c10::Half* b, int64_t ldb, int64_t rows,
                                 int64_t dim, float* res) {
  row_dots_impl<float>(a, lda, b, ldb, rows, dim, res);
}

// ---- the matrix units (gemm.h) ----

bool cpu_has_amx(bool fp16) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
  bool unit = tile && bf16;
  if (fp16) {
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    unit = tile && ((a >> 21) & 1u);
  }
  return unit && at::cpu::init_amx();  // the OS grants the tile state (Linux: arch_prctl), or AMX is off
#else
  return false;
#endif
}

}  // namespace prefix_attn
