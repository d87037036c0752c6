// Philox-4x32-10 (Salmon et al. 2011, the generator of tl.rand) for the attention-dropout mask of
// prefix_attn/dropout.py:
//
//   keep(b, h, i, c): the 16-bit field i % 8 (word (i % 8) / 2, low half for even i) of
//   Philox-4x32-10(key = seed, counter = (c, i / 8, h, b)) is >= threshold16 = floor(p * 2^16).
//
// philox_columns() fills the four output words for n consecutive columns c = col0 .. col0 + n - 1 of one
// (i / 8, h, b); it is the cost of dropout on the CPU, so it has AVX-512 and AVX2 versions (32-bit lanes, the
// 32 x 32 -> 64-bit products of even and odd lanes recombined), chosen at run time, and a scalar one.
#pragma once

#include <cstdint>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFIX_ATTN_X86_SIMD 1
#include <immintrin.h>
#endif

namespace prefix_attn {

struct Dropout {
  bool on = false;
  uint32_t key0 = 0, key1 = 0;  // the 64-bit seed
  uint32_t threshold16 = 0;     // floor(p * 2^16)
  double scale = 1.0;           // 1 / (1 - p)
  int64_t batch_offset = 0;     // added to b (sequence index of a packed batch run one sequence at a time)
};

constexpr uint32_t kPhiloxA = 0xD2511F53u, kPhiloxB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

inline void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(kPhiloxA) * c0;
    const uint64_t pb = static_cast<uint64_t>(kPhiloxB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// out[w * n + j] = word w of Philox(counter = (col0 + j, c1, c2, c3)), j < n, from lane `from` on.
inline void philox_columns_scalar(uint32_t* out, int64_t n, int64_t from, uint32_t col0, uint32_t c1, uint32_t c2,
                                  uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int64_t j = from; j < n; ++j) {
    uint32_t x0 = col0 + static_cast<uint32_t>(j), x1 = c1, x2 = c2, x3 = c3;
    philox4x32_10(x0, x1, x2, x3, k0, k1);
    out[j] = x0;
    out[n + j] = x1;
    out[2 * n + j] = x2;
    out[3 * n + j] = x3;
  }
}

#ifdef PREFIX_ATTN_X86_SIMD
__attribute__((target("avx512f"))) inline void philox_columns_avx512(uint32_t* out, int64_t n, uint32_t col0,
                                                                     uint32_t c1, uint32_t c2, uint32_t c3,
                                                                     uint32_t k0, uint32_t k1) {
  const __m512i A = _mm512_set1_epi32(static_cast<int>(kPhiloxA)), B = _mm512_set1_epi32(static_cast<int>(kPhiloxB));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(col0 + static_cast<uint32_t>(j))), lane);
    __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1)), x2 = _mm512_set1_epi32(static_cast<int>(c2));
    __m512i x3 = _mm512_set1_epi32(static_cast<int>(c3));
    uint32_t ka = k0, kb = k1;
    for (int round = 0; round < 10; ++round) {
      // 64-bit products of the even lanes and of the odd lanes; hi/lo words recombined by blends
      const __m512i pe_a = _mm512_mul_epu32(A, x0), po_a = _mm512_mul_epu32(A, _mm512_srli_epi64(x0, 32));
      const __m512i pe_b = _mm512_mul_epu32(B, x2), po_b = _mm512_mul_epu32(B, _mm512_srli_epi64(x2, 32));
      const __m512i hi_a = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe_a, 32), po_a);
      const __m512i lo_a = _mm512_mask_blend_epi32(0xAAAA, pe_a, _mm512_slli_epi64(po_a, 32));
      const __m512i hi_b = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe_b, 32), po_b);
      const __m512i lo_b = _mm512_mask_blend_epi32(0xAAAA, pe_b, _mm512_slli_epi64(po_b, 32));
      x0 = _mm512_ternarylogic_epi32(hi_b, x1, _mm512_set1_epi32(static_cast<int>(ka)), 0x96);  // a ^ b ^ c
      x2 = _mm512_ternarylogic_epi32(hi_a, x3, _mm512_set1_epi32(static_cast<int>(kb)), 0x96);
      x1 = lo_b;
      x3 = lo_a;
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    _mm512_storeu_si512(out + j, x0);
    _mm512_storeu_si512(out + n + j, x1);
    _mm512_storeu_si512(out + 2 * n + j, x2);
    _mm512_storeu_si512(out + 3 * n + j, x3);
  }
  philox_columns_scalar(out, n, j, col0, c1, c2, c3, k0, k1);
}

__attribute__((target("avx2"))) inline void philox_columns_avx2(uint32_t* out, int64_t n, uint32_t col0, uint32_t c1,
                                                                uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const __m256i A = _mm256_set1_epi32(static_cast<int>(kPhiloxA)), B = _mm256_set1_epi32(static_cast<int>(kPhiloxB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(col0 + static_cast<uint32_t>(j))), lane);
    __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1)), x2 = _mm256_set1_epi32(static_cast<int>(c2));
    __m256i x3 = _mm256_set1_epi32(static_cast<int>(c3));
    uint32_t ka = k0, kb = k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i pe_a = _mm256_mul_epu32(A, x0), po_a = _mm256_mul_epu32(A, _mm256_srli_epi64(x0, 32));
      const __m256i pe_b = _mm256_mul_epu32(B, x2), po_b = _mm256_mul_epu32(B, _mm256_srli_epi64(x2, 32));
      const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(pe_a, 32), po_a, 0xAA);
      const __m256i lo_a = _mm256_blend_epi32(pe_a, _mm256_slli_epi64(po_a, 32), 0xAA);
      const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(pe_b, 32), po_b, 0xAA);
      const __m256i lo_b = _mm256_blend_epi32(pe_b, _mm256_slli_epi64(po_b, 32), 0xAA);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1), _mm256_set1_epi32(static_cast<int>(ka)));
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3), _mm256_set1_epi32(static_cast<int>(kb)));
      x1 = lo_b;
      x3 = lo_a;
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), x0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n + j), x1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * n + j), x2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 3 * n + j), x3);
  }
  philox_columns_scalar(out, n, j, col0, c1, c2, c3, k0, k1);
}
#endif

// Which implementation philox_columns runs: "avx512", "avx2" or "scalar"; the widest the CPU has by default.
inline std::string& philox_isa() {
  static std::string isa = [] {
#ifdef PREFIX_ATTN_X86_SIMD
    if (__builtin_cpu_supports("avx512f")) return std::string("avx512");
    if (__builtin_cpu_supports("avx2")) return std::string("avx2");
#endif
    return std::string("scalar");
  }();
  return isa;
}

inline void philox_columns(uint32_t* out, int64_t n, uint32_t col0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                           uint32_t k1) {
#ifdef PREFIX_ATTN_X86_SIMD
  static const std::string& isa = philox_isa();
  if (isa[0] == 'a' && isa[3] == '5') return philox_columns_avx512(out, n, col0, c1, c2, c3, k0, k1);
  if (isa[0] == 'a') return philox_columns_avx2(out, n, col0, c1, c2, c3, k0, k1);
#endif
  philox_columns_scalar(out, n, 0, col0, c1, c2, c3, k0, k1);
}

}  // namespace prefix_attn
