// The target attributes and tail-lane masks shared by the kernel's AVX-512 and AVX2 loops
// (isa.cpp, gemm_avx512.cpp, gemm_avx2.cpp). The build is portable (no -march=native): these
// functions are compiled for their ISA and called only after the run-time CPU check (isa.cpp).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

// GCC 12's AVX-512 headers seed masked intrinsics with _mm512_undefined_ps(), which its own
// -Wuninitialized flags in every file that uses them; the values are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define WALT_AVX512 __attribute__((target("avx512f")))
#define WALT_AVX2 __attribute__((target("avx2,fma")))

namespace walt::attn {

// Lanes [0, left) of a 16-float vector; left may be <= 0 (none) or >= 16 (all).
WALT_AVX512 inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

// The same for an 8-float vector, as the all-ones lanes masked loads and stores take.
WALT_AVX2 inline __m256i tail8(int64_t left) {
  const int n = left <= 0 ? 0 : left >= 8 ? 8 : int(left);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

}  // namespace walt::attn
#endif  // __x86_64__
