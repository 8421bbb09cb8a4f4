// Row-major float32 GEMM for the attention kernel's window-sized products, AVX-512F.
//
// C (m x N) = alpha op(A) B (K x N) (times an optional per-row scale), beta = 0. Every matrix is
// row-major; a row of A or C is either base + r * ld or, for window tokens read and written in
// place in the float32 tensors, an explicit pointer (see InRows/OutRows in isa.h); B is
// contiguous (base form). op(A) = A (m x K) or, with trans_a, A^T for A stored K x m (the
// backward's P^T dO and dS^T Q, which then need no transposed copies).
//
// Tiles of 4 rows x 64 columns (8 x 32 or 8 x 16 for narrow products) are held in zmm
// accumulators over the K loop: each step of a 4 x 64 tile
// loads four vectors of a B row and broadcasts one element of each of four A rows, 16 FMAs. On
// the Zen 4 this was tuned on that runs at the FMA peak in isolation (8 x 32 tiles, with twice
// the broadcasts per FMA, reached 90%; MKL 83% at these sizes). The operands are a window's rows
// (<= 320 x 320), which stay in L1/L2, so nothing is packed: the kernel lays out or points at
// each operand the way this loop reads it. Compared with calling the BLAS, this also drops its
// per-call packing of both operands and its separate pass over C for beta = 0.
#include <cstdint>

#include "isa.h"
#include "simd.h"

#if defined(__x86_64__)

namespace walt::attn {
namespace {

// One tile of MR rows x 16 NV columns (NV zmm vectors per row) over k in [0, K); FULL: all
// columns exist, else the masks m[0..NV) select them. ar: the MR rows of A (or, with TA, at = A +
// first row, element (r, k) at at[k * lda + r]); bpanel: B at the tile's first column, rows ldb
// apart; cr: the MR output rows, already offset to the tile's first column; mul: each output
// row's multiplier (null: none).
template <int MR, int NV, bool TA, bool FULL>
WALT_AVX512 __attribute__((noinline)) void tile(int64_t K, const float* const* ar, const float* at, int64_t lda,
                                                const float* bpanel, int64_t ldb, float* const* cr,
                                                const float* mul, const __mmask16* m) {
  // Every loop over r and q is fully unrolled so the accumulators live in registers.
  const float* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = TA ? at + r : ar[r];
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) c[r][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = bpanel + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) bv[q] = FULL ? _mm512_loadu_ps(b + 16 * q) : _mm512_maskz_loadu_ps(m[q], b + 16 * q);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(TA ? a[r][k * lda] : a[r][k]);
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) c[r][q] = _mm512_fmadd_ps(x, bv[q], c[r][q]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(mul ? mul[r] : 1.f);
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) {
      float* dst = cr[r] + 16 * q;
      const __m512 x = mul ? _mm512_mul_ps(c[r][q], s) : c[r][q];
      if (FULL) {
        _mm512_storeu_ps(dst, x);
      } else {
        _mm512_mask_storeu_ps(dst, m[q], x);
      }
    }
  }
}

// Rows [i, i + MR) x columns [j, j + 16 NV) of C.
template <int MR, int NV, bool TA>
WALT_AVX512 void row_block(int64_t i, int64_t j, int64_t K, int64_t N, const InRows& A, const float* bpanel,
                           int64_t ldb, const OutRows& C, float alpha) {
  const TileRows<MR> t(TA, i, j, A, C, alpha);
  const int64_t left = N - j;
  if (left >= 16 * NV) {
    tile<MR, NV, TA, true>(K, t.a, t.at, A.ld, bpanel, ldb, t.c, t.mul, nullptr);
  } else {
    __mmask16 cols[NV];
    for (int q = 0; q < NV; ++q) cols[q] = tail16(left - 16 * q);  // the columns of vector q that exist
    tile<MR, NV, TA, false>(K, t.a, t.at, A.ld, bpanel, ldb, t.c, t.mul, cols);
  }
}

// All rows of one column panel [j, j + 16 NV): blocks of MR rows, then the leftovers.
template <int MR, int NV, bool TA>
WALT_AVX512 void panel(int64_t m, int64_t j, int64_t K, int64_t N, const InRows& A, const float* bpanel,
                       int64_t ldb, const OutRows& C, float alpha) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) row_block<MR, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha);
  if constexpr (MR > 4) {
    if (i + 4 <= m) {
      row_block<4, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha);
      i += 4;
    }
  }
  switch (m - i) {
    case 3: row_block<3, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    case 2: row_block<2, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    case 1: row_block<1, NV, TA>(i, j, K, N, A, bpanel, ldb, C, alpha); break;
    default: break;
  }
}

// Column panels of 64, then blocks of rows, each tile running the whole K loop and writing its C
// rows once. B is contiguous (the kernel copies each B operand into thread-local rows first), so
// a tile's B panel streams from L2 along rows the hardware prefetcher follows. (Blocking k in 64
// rows kept the panel in L1 but turned C into a read-modify-write per block; for P V, whose C is
// the output rows in place, whole-K tiles run at 97% of the FMA peak against 92% blocked: 256 x 64
// x 256, Zen 4, and were faster at every window and head size tried.) Narrow products (N = d of
// 16 or 32, the small models' heads) use tiles of one or two vectors and 8 rows instead of 4 x 4
// vectors, so no FMA works on masked-off columns; so do the last columns of wider products (an
// 80-token window's logits: one 64-wide panel and one 16-wide, not a 4 x 4 tile 3/4 masked).
template <bool TA>
WALT_AVX512 void gemm(int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B, const OutRows& C,
                      float alpha) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) panel<4, 4, TA>(m, j, K, N, A, B.base + j, B.ld, C, alpha);
  for (; j + 16 < N; j += 32) panel<8, 2, TA>(m, j, K, N, A, B.base + j, B.ld, C, alpha);
  if (j < N) panel<8, 1, TA>(m, j, K, N, A, B.base + j, B.ld, C, alpha);
}

}  // namespace

// 16 x 16 block transpose in registers: 32-bit then 64-bit interleaves within 128-bit lanes, then
// two rounds of 128-bit lane shuffles; 64 shuffles instead of 256 scalar loads and stores.
WALT_AVX512 void transpose16_avx512(const float* const* src, int64_t col0, float* dst, int64_t ld, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src[i] + col0);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // lane: a2 b2 a3 b3
  }
  for (int k = 0; k < 16; k += 4) {  // u[k + j], lane L: column 4 L + j of rows k .. k+3
    u[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {  // column 4 L + j = lane L of u[j], u[4 + j], u[8 + j], u[12 + j]
    const __m512 x0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    _mm512_storeu_ps(dst + (j)*ld, _mm512_mul_ps(_mm512_shuffle_f32x4(x0, y0, 0x88), s));
    _mm512_storeu_ps(dst + (4 + j) * ld, _mm512_mul_ps(_mm512_shuffle_f32x4(x0, y0, 0xDD), s));
    _mm512_storeu_ps(dst + (8 + j) * ld, _mm512_mul_ps(_mm512_shuffle_f32x4(x1, y1, 0x88), s));
    _mm512_storeu_ps(dst + (12 + j) * ld, _mm512_mul_ps(_mm512_shuffle_f32x4(x1, y1, 0xDD), s));
  }
}

void gemm_rows_avx512(bool trans_a, int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B,
                      const OutRows& C, float alpha) {
  trans_a ? gemm<true>(m, N, K, A, B, C, alpha) : gemm<false>(m, N, K, A, B, C, alpha);
}

}  // namespace walt::attn
#endif  // __x86_64__
