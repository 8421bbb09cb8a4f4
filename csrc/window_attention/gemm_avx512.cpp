// Row-major float32 GEMM for the attention kernel's window-sized products, AVX-512F.
//
// C (m x N) = alpha op(A) B (K x N) (times an optional per-row scale), beta = 0. Every matrix is
// row-major; a row is either base + r * ld or, for window tokens read and written in place in
// the float32 tensors, an explicit pointer (see InRows/OutRows in rows.h). op(A) = A (m x K) or,
// with trans_a, A^T for A stored K x m (the backward's P^T dO and dS^T Q, which then need no
// transposed copies). Tiles of 8 rows x 32 columns are held in 16 zmm accumulators over the whole K loop: each
// step loads two vectors of a B row and broadcasts one element of each of eight A rows, 16 FMAs
// (about 90% of the FMA peak on the Zen 4 this was tuned on, against MKL's 83% at these sizes).
// The operands are the kernel's own thread-local buffers (a window's rows, <= 320 x 320), which
// sit in L1/L2, so no packing is needed: the kernel's gathers already lay each operand out the
// way this loop reads it. Compared with calling the BLAS, this drops the BLAS's per-call packing
// of both operands and its separate pass over C for beta = 0, which at these sizes cost as much
// as the exp of the softmax.
#include <cstdint>

#include "rows.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace walt::attn {
namespace {

constexpr int kMR = 8;

// One tile of MR rows x 32 columns (masked at the right edge). ar: the MR rows of A (or, with
// TA, at = A + first row, element (r, k) at at[k * lda + r]); cr: the MR output rows, already
// offset to the tile's first column; mul: the multiplier of each output row.
template <int MR, bool TA, bool BP>
__attribute__((target("avx512f"), noinline)) void tile(int64_t K, const float* const* ar, const float* at, int64_t lda,
                                                   const float* bbase, int64_t ldb, const float* const* bptr,
                                                   int64_t j, float* const* cr, const float* mul, __mmask16 m0,
                                                   __mmask16 m1) {
  const float* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = TA ? at + r : ar[r];
  // Every loop over r is fully unrolled so the accumulators live in registers.
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = BP ? bptr[k] + j : bbase + k * ldb + j;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(TA ? a[r][k * lda] : a[r][k]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(mul[r]);
    _mm512_mask_storeu_ps(cr[r], m0, _mm512_mul_ps(c0[r], s));
    _mm512_mask_storeu_ps(cr[r] + 16, m1, _mm512_mul_ps(c1[r], s));
  }
}

template <int MR, bool TA, bool BP>
__attribute__((target("avx512f"))) void row_block(int64_t i, int64_t N, int64_t K, const InRows& A, const InRows& B,
                                                 const OutRows& C, float alpha) {
  const float* ar[MR];
  float* cr[MR];
  float mul[MR];
  for (int r = 0; r < MR; ++r) {
    ar[r] = TA ? nullptr : A.row(i + r);
    mul[r] = C.scale ? alpha * C.scale[i + r] : alpha;
  }
  const float* at = TA ? A.base + i : nullptr;
  for (int64_t j = 0; j < N; j += 32) {
    const int64_t left = N - j;
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1u);
    for (int r = 0; r < MR; ++r) cr[r] = C.row(i + r) + j;
    tile<MR, TA, BP>(K, ar, at, A.ld, B.base, B.ld, B.ptr, j, cr, mul, m0, m1);
  }
}

template <bool TA, bool BP>
__attribute__((target("avx512f"))) void gemm(int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B,
                                            const OutRows& C, float alpha) {
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR) row_block<kMR, TA, BP>(i, N, K, A, B, C, alpha);
  switch (m - i) {
    case 7: row_block<7, TA, BP>(i, N, K, A, B, C, alpha); break;
    case 6: row_block<6, TA, BP>(i, N, K, A, B, C, alpha); break;
    case 5: row_block<5, TA, BP>(i, N, K, A, B, C, alpha); break;
    case 4: row_block<4, TA, BP>(i, N, K, A, B, C, alpha); break;
    case 3: row_block<3, TA, BP>(i, N, K, A, B, C, alpha); break;
    case 2: row_block<2, TA, BP>(i, N, K, A, B, C, alpha); break;
    case 1: row_block<1, TA, BP>(i, N, K, A, B, C, alpha); break;
    default: break;
  }
}

}  // namespace

void gemm_rows_avx512(bool trans_a, int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B,
                      const OutRows& C, float alpha) {
  if (trans_a) {
    B.ptr ? gemm<true, true>(m, N, K, A, B, C, alpha) : gemm<true, false>(m, N, K, A, B, C, alpha);
  } else {
    B.ptr ? gemm<false, true>(m, N, K, A, B, C, alpha) : gemm<false, false>(m, N, K, A, B, C, alpha);
  }
}

}  // namespace walt::attn
#endif  // __x86_64__
