// The CPU kernel's ISA dispatch table: the float32 row loops (softmax and its backward) and the
// GEMM, compiled for AVX-512, AVX2+FMA and a baseline (isa.cpp, gemm_avx512.cpp, gemm_avx2.cpp),
// one set picked once at run time from the CPU's features (row_ops()). The build is portable (no
// -march=native), so these are the only places that use wider vectors than SSE2. One ISA gives
// one result: the same machine always reproduces the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

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

// The row loops in plain C++, for any floating type: the baseline RowOps (float) and the float64
// kernel's row loops (std::exp and std::log, no vectors).
template <typename T>
struct PlainRows {
  static T max(const T* x, int64_t n) {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
  static T exp_sum(T* x, int64_t n, T sub) {
    T s = 0;
    for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - sub));
    return s;
  }
  static void log_add(T* lse, const T* m, int64_t n) {
    for (int64_t i = 0; i < n; ++i) lse[i] = m[i] + std::log(lse[i]);
  }
  static void exp(T* x, int64_t n, T sub) {
    for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - sub);
  }
  static void scale_copy(T* dst, const T* src, int64_t n, T s) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * s;
  }
  static void softmax_grad(T* p, const T* dp, int64_t n, T delta) {
    for (int64_t j = 0; j < n; ++j) p[j] *= dp[j] - delta;
  }
  static void softmax_grad_dp(T* dp, const T* p, int64_t n, T delta) {
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
  }
  static T dot(const T* a, const T* b, int64_t n) {
    T s = 0;
    for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
    return s;
  }
  static void add(T* x, const T* b, int64_t n) {
    for (int64_t j = 0; j < n; ++j) x[j] += b[j];
  }
  static void bias_add(T* row, const T* rev, const BiasRuns& r) {
    for (int64_t t = 0; t < r.et; ++t)
      for (int64_t h = 0; h < r.eh; ++h)
        for (int64_t w = 0; w < r.ew; ++w) row[(t * r.eh + h) * r.ew + w] += rev[t * r.step_t + h * r.step_h + w];
  }
  static void bias_acc(T* rev, const T* row, const BiasRuns& r) {
    for (int64_t t = 0; t < r.et; ++t)
      for (int64_t h = 0; h < r.eh; ++h)
        for (int64_t w = 0; w < r.ew; ++w) rev[t * r.step_t + h * r.step_h + w] += row[(t * r.eh + h) * r.ew + w];
  }
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
