// Tile products of the CPU kernel: row-major C = alpha * op(A) op(B) + beta * C through the BLAS inside
// libtorch_cpu (see gemm() below); for 16-bit operands, its bfloat16/float16 GEMM with float32 accumulation
// (gemm16(), on the AMX tiles where the CPU has them).
#pragma once

#include <torch/extension.h>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attrs.h"

namespace prefix_attn {

// ---- matrix products on tiles ----
//
// Row-major C[M, N] = alpha * op(A) op(B) + beta * C with leading dimensions, through the Fortran BLAS that
// torch itself links (MKL's sgemm_/dgemm_ in the x86 wheels), looked up at run time in libtorch_cpu. A tile
// product is then a plain call, without the few microseconds of tensor bookkeeping an at::mm costs per
// call (measured: ~40% of the kernel time at these tile sizes). Where torch exports no BLAS symbol, the
// same products run through at::mm_out / addmm_ on tensor views of the tiles.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);

// MKL's row-major CBLAS cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32: 16-bit A and B, float C
using gemm16_fn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const void* a,
                           int lda, const void* b, int ldb, float beta, float* c, int ldc);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  gemm16_fn bf16 = nullptr, f16 = nullptr;
  bool use = false;
};

inline Blas find_blas() {
  Blas blas;
#if defined(__linux__) || defined(__APPLE__)
#if defined(__APPLE__)
  const char* lib = "libtorch_cpu.dylib";
#else
  const char* lib = "libtorch_cpu.so";
#endif
  void* handle = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD);  // already loaded by `import torch`
  if (handle != nullptr) {
    blas.sgemm = reinterpret_cast<sgemm_fn>(dlsym(handle, "sgemm_"));
    blas.dgemm = reinterpret_cast<dgemm_fn>(dlsym(handle, "dgemm_"));
    blas.bf16 = reinterpret_cast<gemm16_fn>(dlsym(handle, "cblas_gemm_bf16bf16f32"));
    blas.f16 = reinterpret_cast<gemm16_fn>(dlsym(handle, "cblas_gemm_f16f16f32"));
  }
#endif
  blas.use = blas.sgemm != nullptr && blas.dgemm != nullptr;
  return blas;
}

inline Blas& blas() {
  static Blas b = find_blas();
  return b;
}

template <typename T>
at::Tensor tile_view(const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor t = trans ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t()
                       : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  return t;
}

// A few rows of A (a decode step's queries, a GQA group's heads): a BLAS call per tile costs more than the
// arithmetic, so the product is computed here, in a fixed order (deterministic run to run), each row of B read
// once for all the rows of A. The float entry point is multiversioned as the row passes (tile_ops.cpp).
constexpr int64_t kSmallM = 8;

template <typename T>
PREFIX_ATTN_INLINE void small_gemm_impl(bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                                        int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (trans_b) {  // C = alpha A B^T + beta C: one dot product per (row, column), B's rows contiguous
    for (int64_t j = 0; j < N; ++j) {
      const T* b = B + j * ldb;
      for (int64_t r = 0; r < M; ++r) {
        const T* a = A + r * lda;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t x = 0; x < K; ++x) acc += a[x] * b[x];
        T* c = C + r * ldc + j;
        *c = alpha * acc + (beta == T(0) ? T(0) : beta * *c);
      }
    }
    return;
  }
  // C = alpha A B + beta C: rows of B scaled and added, contiguous
  for (int64_t r = 0; r < M; ++r) {
    T* c = C + r * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < N; ++j) c[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
  for (int64_t x = 0; x < K; ++x) {
    const T* b = B + x * ldb;
    for (int64_t r = 0; r < M; ++r) {
      const T w = alpha * A[r * lda + x];
      if (w == T(0)) continue;
      T* c = C + r * ldc;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += w * b[j];
    }
  }
}

// defined in tile_ops.cpp
void small_gemm(bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void small_gemm(bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (!trans_a && M <= kSmallM) {
    small_gemm(trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const Blas& bl = blas();
  if (bl.use && M < INT32_MAX && N < INT32_MAX && K < INT32_MAX && lda < INT32_MAX && ldb < INT32_MAX &&
      ldc < INT32_MAX) {
    // column-major BLAS computes C^T = op(B)^T op(A)^T on the same memory
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(lda, 1)), lb = static_cast<int>(std::max<int64_t>(ldb, 1));
    const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
    if constexpr (std::is_same<T, float>::value) {
      bl.sgemm(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    } else {
      bl.dgemm(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    }
    return;
  }
  at::Tensor a = tile_view(A, M, K, lda, trans_a), b = tile_view(B, K, N, ldb, trans_b);
  at::Tensor c = tile_view(C, M, N, ldc, false);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// ---- 16-bit tile products ----
//
// 16-bit inputs are computed either in float32 (their rows converted, the products in sgemm) or with 16-bit
// products: Q, K, V, dO read in place, the probabilities and dS rounded to the input's type before the products
// that take them (as flash-attention does), float32 accumulation and softmax. The second is the faster where the
// CPU multiplies 16-bit tiles natively (AMX: 3-4x sgemm on the kernel's tiles), the first elsewhere (MKL then
// emulates). "auto" picks by the CPU: bfloat16 products with AMX-BF16, float16 products with AMX-FP16.
enum class Products16 { kAuto, kFloat32, k16Bit };

inline Products16& products16_mode() {
  static Products16 mode = Products16::kAuto;
  return mode;
}

bool cpu_has_amx(bool fp16);  // defined in tile_ops.cpp

template <typename TI>
bool products16_available() {
  return (std::is_same<TI, c10::BFloat16>::value ? blas().bf16 : blas().f16) != nullptr;
}

// whether inputs of type TI take 16-bit products now
template <typename TI>
bool use_products16() {
  if (!products16_available<TI>()) return false;
  switch (products16_mode()) {
    case Products16::kFloat32: return false;
    case Products16::k16Bit: return true;
    default: {
      static const bool amx = cpu_has_amx(std::is_same<TI, c10::Half>::value);
      return amx;
    }
  }
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C, A and B 16-bit, C float (products16_available()).
template <typename TM>
void gemm16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const TM* A, int64_t lda,
            const TM* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  static_assert(std::is_same<TM, c10::BFloat16>::value || std::is_same<TM, c10::Half>::value, "16-bit operands");
  if (M == 0 || N == 0) return;
  TORCH_CHECK(M < INT32_MAX && N < INT32_MAX && K < INT32_MAX && lda < INT32_MAX && ldb < INT32_MAX &&
                  ldc < INT32_MAX, "prefix_attn cpu: a tile product too large for a 32-bit BLAS");
  const gemm16_fn fn = std::is_same<TM, c10::BFloat16>::value ? blas().bf16 : blas().f16;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enums
  fn(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(M), static_cast<int>(N),
     static_cast<int>(K), alpha, A, static_cast<int>(std::max<int64_t>(lda, 1)), B,
     static_cast<int>(std::max<int64_t>(ldb, 1)), beta, C, static_cast<int>(std::max<int64_t>(ldc, 1)));
}

// The kernel's tile product: operands of type TM (the compute type T, or the 16-bit input type), C in T.
template <typename T, typename TM>
PREFIX_ATTN_INLINE void tile_mm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const TM* A,
                                int64_t lda, const TM* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same<T, TM>::value) {
    gemm<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm16<TM>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace prefix_attn
