// Function attributes of the CPU kernel: forced inlining of the per-tile helpers, and the x86 clone list of the
// multiversioned entry points (x86-64 baseline, AVX2+FMA, AVX-512; the loader picks the widest the CPU supports).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PREFIX_ATTN_NO_CLONES)
#define PREFIX_ATTN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define PREFIX_ATTN_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PREFIX_ATTN_INLINE inline __attribute__((always_inline))
#else
#define PREFIX_ATTN_INLINE inline
#endif
