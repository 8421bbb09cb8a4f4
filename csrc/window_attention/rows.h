// Row loops of the float32 attention kernel (softmax and its backward) and its GEMM, compiled
// for AVX-512, AVX2+FMA and a baseline and picked once at run time from the CPU's features. The build is
// portable (no -march=native), so these are the only places that use wider vectors than SSE2.
// One ISA gives one result: the same machine always reproduces the same bits.
#pragma once

#include <cstdint>

namespace walt::attn {

// The rows of a row-major float32 GEMM operand: row r at ptr[r] when ptr is set (window tokens
// read in place from a strided tensor), else at base + r * ld.
struct InRows {
  const float* base;
  int64_t ld;
  const float* const* ptr = nullptr;
  const float* row(int64_t r) const { return ptr ? ptr[r] : base + r * ld; }
};
// The same for the output, plus an optional multiplier per row (the softmax's 1 / sum).
struct OutRows {
  float* base;
  int64_t ld;
  float* const* ptr = nullptr;
  const float* scale = nullptr;
  float* row(int64_t r) const { return ptr ? ptr[r] : base + r * ld; }
};

// Rows [i, i + MR) of a GEMM tile at column j (gemm_avx512.cpp, gemm_avx2.cpp): A's rows (or, for
// op(A) = A^T, at = A + i), C's rows, and each row's multiplier alpha C.scale[r] (mul is null when
// the product has none, so the tile skips the multiply). Not copyable: mul points into it.
template <int MR>
struct TileRows {
  const float* a[MR];
  float* c[MR];
  const float* at;
  const float* mul;
  float row_mul[MR];
  TileRows(bool trans_a, int64_t i, int64_t j, const InRows& A, const OutRows& C, float alpha) {
    for (int r = 0; r < MR; ++r) {
      a[r] = trans_a ? nullptr : A.row(i + r);
      c[r] = C.row(i + r) + j;
      row_mul[r] = C.scale ? alpha * C.scale[i + r] : alpha;
    }
    at = trans_a ? A.base + i : nullptr;
    mul = C.scale || alpha != 1.f ? row_mul : nullptr;
  }
  TileRows(const TileRows&) = delete;
  TileRows& operator=(const TileRows&) = delete;
};

// The relative position bias of one query row, read from a head's table stored in reverse flat
// order: the keys of a row come in runs of `ew` consecutive w (one run per key (t, h)), and along
// a run the reversed table's index rises by one per key, so a run is a contiguous slice of it.
// Key (t, h, w) of the row sits at row offset (t * eh + h) * ew + w and reads reversed-table
// entry t * step_t + h * step_h + w, relative to the row's first run.
struct BiasRuns {
  int64_t et, eh, ew;
  int64_t step_t, step_h;  // (2 rh - 1)(2 rw - 1) and 2 rw - 1: table strides of t and h
};

struct RowOps {
  const char* isa;
  // max_j x[j]
  float (*max)(const float* x, int64_t n);
  // x[j] = exp(x[j] - sub) in place; returns sum_j x[j] (after exp). exp(-inf) is 0.
  float (*exp_sum)(float* x, int64_t n, float sub);
  // lse[i] = m[i] + log(lse[i]): rows' logsumexp from their max and (in lse) their sum of exp.
  void (*log_add)(float* lse, const float* m, int64_t n);
  // x[j] = exp(x[j] - sub) in place.
  void (*exp)(float* x, int64_t n, float sub);
  // dst[j] = src[j] * s. (Plain stores: streaming ones measured slower, the kept probabilities
  // of a small model's layers stay in L2/L3 until the backward reads them.)
  void (*scale_copy)(float* dst, const float* src, int64_t n, float s);
  // p[j] = p[j] * (dp[j] - delta): the softmax backward, dS = P o (dP - rowsum(dO o O)).
  void (*softmax_grad)(float* p, const float* dp, int64_t n, float delta);
  // dp[j] = p[j] * (dp[j] - delta): the same, into dp (p is the forward's kept probabilities).
  void (*softmax_grad_dp)(float* dp, const float* p, int64_t n, float delta);
  // sum_j a[j] * b[j]
  float (*dot)(const float* a, const float* b, int64_t n);
  // x[j] += b[j]
  void (*add)(float* x, const float* b, int64_t n);
  // row += bias of its keys, from the reversed table `rev` at the row's first run (BiasRuns).
  void (*bias_add)(float* row, const float* rev, const BiasRuns& runs);
  // rev += row, scattered the same way: the row's contribution to the bias gradient.
  void (*bias_acc)(float* rev, const float* row, const BiasRuns& runs);
  // C (m x N) = alpha op(A) B (K x N) for window-sized operands, op(A) = A (m x K) or A^T (A
  // stored K x m, base form only), B in base form; null where the kernel should call the BLAS
  // instead (see gemm_avx512.cpp, gemm_avx2.cpp).
  void (*gemm)(bool trans_a, int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B, const OutRows& C,
               float alpha);
  // dst[c * ld + i] = scale * src[i][col0 + c] for i, c in [0, 16): a 16 x 16 block transpose for
  // the GEMM's B operands; null where gemm is.
  void (*transpose16)(const float* const* src, int64_t col0, float* dst, int64_t ld, float scale);
};

#if defined(__x86_64__)
void transpose16_avx512(const float* const* src, int64_t col0, float* dst, int64_t ld, float scale);
void gemm_rows_avx512(bool trans_a, int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B,
                      const OutRows& C, float alpha);
void transpose16_avx2(const float* const* src, int64_t col0, float* dst, int64_t ld, float scale);
void gemm_rows_avx2(bool trans_a, int64_t m, int64_t N, int64_t K, const InRows& A, const InRows& B, const OutRows& C,
                    float alpha);
#endif

const RowOps& row_ops();

}  // namespace walt::attn
