// Row loops of the float32 attention kernel (softmax and its backward) and its GEMM, compiled
// for AVX-512, AVX2+FMA and a baseline and picked once at run time from the CPU's features. The build is
// portable (no -march=native), so these are the only places that use wider vectors than SSE2.
// One ISA gives one result: the same machine always reproduces the same bits.
#pragma once

#include <cstdint>

namespace walt::attn {

struct RowOps {
  const char* isa;
  // max_j x[j]
  float (*max)(const float* x, int64_t n);
  // x[j] = exp(x[j] - sub) in place; returns sum_j x[j] (after exp). exp(-inf) is 0.
  float (*exp_sum)(float* x, int64_t n, float sub);
  // x[j] = exp(x[j] - sub) in place.
  void (*exp)(float* x, int64_t n, float sub);
  // p[j] = p[j] * (dp[j] - delta): the softmax backward, dS = P o (dP - rowsum(dO o O)).
  void (*softmax_grad)(float* p, const float* dp, int64_t n, float delta);
  // sum_j a[j] * b[j]
  float (*dot)(const float* a, const float* b, int64_t n);
  // Row-major C (m x N) = op(A) B (K x N) for window-sized operands, op(A) = A (m x K) or A^T
  // (A stored K x m); null where the kernel should call the BLAS instead (see gemm_avx512.cpp).
  void (*gemm)(bool trans_a, int64_t m, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc);
};

#if defined(__x86_64__)
void gemm_rm_avx512(bool trans_a, int64_t m, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc);
#endif

const RowOps& row_ops();

}  // namespace walt::attn
