// Philox4x32-10 for 8 (AVX2) or 16 (AVX-512) consecutive blocks at once, for the CPU noise kernel.
// Bitwise the same as walt::philox4x32_10 (tests/cpp/test_philox.cpp checks it); it exists because
// compilers vectorize the scalar form's 32x32->64 multiplies poorly, while vpmuludq does two
// lanes' full products in one instruction. x86-64 host code only; callers dispatch at run time
// (walt/cpu_features.h), so the functions carry their own target attributes.
#pragma once

#if defined(__x86_64__) && !defined(__CUDACC__)

#include <immintrin.h>

#include <cstdint>

#include "walt/philox.h"

namespace walt {

// Outputs of blocks (lo0 + j, hi) for j in [0, lanes): word w of block j goes to out[w][j].
// `out` holds 4 rows of at least `lanes` uint32 values.
__attribute__((target("avx512f"))) inline void philox4x32_10_x16(uint32_t lo0, uint32_t hi, uint32_t key_lo,
                                                                  uint32_t key_hi, uint32_t k0, uint32_t k1,
                                                                  uint32_t* const out[4]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox_detail::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox_detail::kM1));
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(hi));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(key_lo));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(key_hi));
  // GCC 12's unmasked AVX-512 intrinsics trip -Wmaybe-uninitialized (GCC bug 105593); the masked
  // forms below say the same thing and also fold the hi/lo lane blends into the shuffles.
  constexpr __mmask16 all = 0xFFFF, even = 0x5555, odd = 0xAAAA;
  constexpr __mmask8 all64 = 0xFF;
  for (int r = 0; r < 10; ++r) {
    // Full 64-bit products: vpmuludq multiplies the low dword of each qword, so the even lanes
    // directly and the odd lanes after swapping the dwords of every qword (CDAB).
    const __m512i p0e = _mm512_maskz_mul_epu32(all64, c0, m0);
    const __m512i p0o = _mm512_maskz_mul_epu32(all64, _mm512_mask_shuffle_epi32(c0, all, c0, _MM_PERM_CDAB), m0);
    const __m512i p1e = _mm512_maskz_mul_epu32(all64, c2, m1);
    const __m512i p1o = _mm512_maskz_mul_epu32(all64, _mm512_mask_shuffle_epi32(c2, all, c2, _MM_PERM_CDAB), m1);
    // hi: even lanes take the even product's high dword (swapped down), odd lanes already hold theirs;
    // lo: odd lanes take the odd product's low dword (swapped up), even lanes already hold theirs.
    const __m512i hi0 = _mm512_mask_shuffle_epi32(p0o, even, p0e, _MM_PERM_CDAB);
    const __m512i lo0v = _mm512_mask_shuffle_epi32(p0e, odd, p0o, _MM_PERM_CDAB);
    const __m512i hi1 = _mm512_mask_shuffle_epi32(p1o, even, p1e, _MM_PERM_CDAB);
    const __m512i lo1 = _mm512_mask_shuffle_epi32(p1e, odd, p1o, _MM_PERM_CDAB);
    const __m512i kk0 = _mm512_set1_epi32(static_cast<int>(k0)), kk1 = _mm512_set1_epi32(static_cast<int>(k1));
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), kk0);
    c1 = lo1;
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), kk1);
    c3 = lo0v;
    c2 = n2;
    k0 += philox_detail::kW0;
    k1 += philox_detail::kW1;
  }
  _mm512_storeu_si512(out[0], c0);
  _mm512_storeu_si512(out[1], c1);
  _mm512_storeu_si512(out[2], c2);
  _mm512_storeu_si512(out[3], c3);
}

__attribute__((target("avx2"))) inline void philox4x32_10_x8(uint32_t lo0, uint32_t hi, uint32_t key_lo,
                                                              uint32_t key_hi, uint32_t k0, uint32_t k1,
                                                              uint32_t* const out[4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox_detail::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox_detail::kM1));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(hi));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(key_lo));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(key_hi));
  for (int r = 0; r < 10; ++r) {
    const __m256i p0e = _mm256_mul_epu32(c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
    const __m256i p1e = _mm256_mul_epu32(c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
    const __m256i lo0v = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
    const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
    const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
    const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(k0)), kk1 = _mm256_set1_epi32(static_cast<int>(k1));
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), kk0);
    c1 = lo1;
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), kk1);
    c3 = lo0v;
    c2 = n2;
    k0 += philox_detail::kW0;
    k1 += philox_detail::kW1;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[0]), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[1]), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[2]), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[3]), c3);
}

}  // namespace walt

#endif
