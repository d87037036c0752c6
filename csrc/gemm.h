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

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
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
