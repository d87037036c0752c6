// Tile products of the CPU kernel: row-major C = alpha * op(A) op(B) + beta * C through the BLAS inside
// libtorch_cpu (see gemm() below).
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

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
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
// once for all the rows of A. The float entry point is multiversioned as the row passes (prefix_attn_cpu.cpp).
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

// defined in prefix_attn_cpu.cpp
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

}  // namespace prefix_attn
