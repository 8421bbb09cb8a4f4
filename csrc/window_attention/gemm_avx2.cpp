// Row-major float32 GEMM for the attention kernel's window-sized products, AVX2 + FMA: the same
// products and operand forms as gemm_avx512.cpp (see there), in 256-bit vectors for the CPUs
// without AVX-512 that most laptops have.
//
// A tile holds 6 rows x 16 columns in 12 ymm accumulators over the whole K loop: each k step
// loads the two vectors of a B row and broadcasts one element of each of six A rows, 12 FMAs
// against 8 loads, which keeps two FMA pipes busy with 15 of the 16 ymm registers. Column panels
// of 16, then blocks of rows; a last panel narrower than 16 columns uses masked loads and stores.
#include <cstdint>

#include "isa.h"
#include "simd.h"

#if defined(__x86_64__)

namespace walt::attn {
namespace {

// One tile of MR rows x 8 NV columns over k in [0, K); the arguments as in gemm_avx512.cpp's
// tile, with m[0..NV) the lane masks of a partial tile (FULL: all columns exist).
template <int MR, int NV, bool TA, bool FULL>
WALT_AVX2 __attribute__((noinline)) void tile(int64_t K, const float* const* ar, const float* at, int64_t lda,
                                              const float* bpanel, int64_t ldb, float* const* cr, const float* mul,
                                              const __m256i* m) {
  const float* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = TA ? at + r : ar[r];
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NV; ++q) c[r][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = bpanel + k * ldb;
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int q = 0; q < NV; ++q) bv[q] = FULL ? _mm256_loadu_ps(b + 8 * q) : _mm256_maskload_ps(b + 8 * q, m[q]);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(TA ? a[r] + k * lda : a[r] + k);
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) c[r][q] = _mm256_fmadd_ps(x, bv[q], c[r][q]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m256 s = _mm256_set1_ps(mul ? mul[r] : 1.f);
#pragma GCC unroll 2
    for (int q = 0; q < NV; ++q) {
      const __m256 x = mul ? _mm256_mul_ps(c[r][q], s) : c[r][q];
      if (FULL) {
        _mm256_storeu_ps(cr[r] + 8 * q, x);
      } else {
        _mm256_maskstore_ps(cr[r] + 8 * q, m[q], x);
      }
    }
  }
}

// Rows [i, i + MR) x columns [j, j + 8 NV) of C.
template <int MR, int NV, bool TA>
WALT_AVX2 void row_block(int64_t i, int64_t j, int64_t K, int64_t N, const InRows& A, const float* bpanel, int64_t ldb,
                         const OutRows& C, float alpha) {
  const TileRows<MR> t(TA, i, j, A, C, alpha);
  const int64_t left = N - j;
  if (left >= 8 * NV) {
    tile<MR, NV, TA, true>(K, t.a, t.at, A.ld, bpanel, ldb, t.c, t.mul, nullptr);
  } else {
    __m256i cols[NV];
    for (int q = 0; q < NV; ++q) cols[q] = tail8(left - 8 * q);
    tile<MR, NV, TA, false>(K, t.a, t.at, A.ld, bpanel, ldb, t.c, t.mul, cols);
  }
}

// All rows of one column panel [j, j + 8 NV): blocks of 6 rows, then the leftovers.
template <int NV, bool TA>
WALT_AVX2 void panel(int64_t m, int64_t j, int64_t K, int64_t N, const InRows& A, const float* bpanel, int64_t ldb,
                     const OutRows& C, float alpha) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) row_block<6, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha);
  switch (m - i) {
    case 5: row_block<5, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    case 4: row_block<4, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    case 3: row_block<3, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    case 2: row_block<2, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    case 1: row_block<1, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    default: break;
  }
}

template <bool TA>
WALT_AVX2 void gemm(int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B, const OutRows& C, float alpha) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) panel<2, TA>(m, j, K, N, A, B.base + j, B.ld, C, alpha);
  if (N - j > 8) {
    panel<2, TA>(m, j, K, N, A, B.base + j, B.ld, C, alpha);
  } else if (j < N) {
    panel<1, TA>(m, j, K, N, A, B.base + j, B.ld, C, alpha);
  }
}

// dst[c * ld + i] = scale * src[i][col0 + c] for i, c in [0, 8): interleaves of row pairs, then
// of pairs of pairs within 128-bit lanes, then the lanes swapped across.
WALT_AVX2 inline void transpose8(const float* const* src, int64_t col0, float* dst, int64_t ld, __m256 s) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    const __m256 a = _mm256_loadu_ps(src[i] + col0), b = _mm256_loadu_ps(src[i + 1] + col0);
    t[i] = _mm256_unpacklo_ps(a, b);      // lane: a0 b0 a1 b1
    t[i + 1] = _mm256_unpackhi_ps(a, b);  // lane: a2 b2 a3 b3
  }
  for (int k = 0; k < 8; k += 4) {  // u[k + j], lane L: column 4 L + j of rows k .. k+3
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ld, _mm256_mul_ps(_mm256_permute2f128_ps(u[j], u[4 + j], 0x20), s));
    _mm256_storeu_ps(dst + (4 + j) * ld, _mm256_mul_ps(_mm256_permute2f128_ps(u[j], u[4 + j], 0x31), s));
  }
}

}  // namespace

WALT_AVX2 void transpose16_avx2(const float* const* src, int64_t col0, float* dst, int64_t ld, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int i = 0; i < 16; i += 8)
    for (int c = 0; c < 16; c += 8) transpose8(src + i, col0 + c, dst + c * ld + i, ld, s);
}

void gemm_rows_avx2(bool trans_a, int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B, const OutRows& C,
                    float alpha) {
  trans_a ? gemm<true>(m, N, K, A, B, C, alpha) : gemm<false>(m, N, K, A, B, C, alpha);
}

}  // namespace walt::attn
#endif  // __x86_64__
