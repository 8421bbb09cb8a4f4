// See isa.h. The exp, on both ISAs: n = round(x log2 e); f = x log2 e - n in [-1/2, 1/2],
// computed with log2 e split in two floats and fused multiply-adds, so f is exact to a rounding;
// 2^f by a degree-5 polynomial fitted for relative error (7.5e-8 on the interval); times 2^n
// (scalef on AVX-512, exponent bits on AVX2). Within 1.9 ulp of exp over [-87.3, 0] (checked
// against float64 at 2e6 points per range); 9 FMA-pipe operations per vector where Cephes' expf
// scheme takes 11, and after the GEMMs the exp is the largest cost of a forward. Inputs are
// logits minus their row max or logsumexp (<= 0 up to a rounding); below -87.3 the true value is
// subnormal and we return 0, which also maps -inf (masked logits) to exactly 0. NaN stays NaN.
#include "isa.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "simd.h"
#include "walt/constants.h"
#include "walt/cpu_features.h"

namespace walt::attn {
namespace {

constexpr float kExpLo = -87.33654f;
constexpr float kLog2eHi = kLog2e;                  // float(log2 e) = 1.44269502162933349609375
constexpr float kLog2eLo = 1.925963033500011e-08f;  // log2 e - kLog2eHi
constexpr float kE0 = 1.0000000716545798f, kE1 = 0.6931469670614677f, kE2 = 0.2402211972418474f;
constexpr float kE3 = 0.05550713278876275f, kE4 = 0.009675541320609927f, kE5 = 0.001327647025394137f;

#if defined(__x86_64__)
// ---------------------------------------------------------------- AVX-512F

WALT_AVX512 inline __m512 exp16(__m512 x) {
  // Below kExpLo (and for -inf, where f would be NaN) the result is forced to 0.
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2eHi)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(x, _mm512_set1_ps(kLog2eHi), n);
  f = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2eLo), f);
  __m512 p = _mm512_set1_ps(kE5);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE0));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// log x for x >= 0 (0 -> -inf, +inf -> +inf, NaN -> NaN): x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172, by its series to t^9 (2.4e-9 relative).
WALT_AVX512 inline __m512 log16(__m512 x) {
  __m512 e = _mm512_getexp_ps(x);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.f));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(m, _mm512_set1_ps(1.f)), _mm512_add_ps(m, _mm512_set1_ps(1.f)));
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(1.f / 9);
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f / 7));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f / 5));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f / 3));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f));
  const __m512 log_m = _mm512_mul_ps(_mm512_add_ps(t, t), p);
  // e ln 2 with ln 2 split in two floats: kLn2 + (ln 2 - kLn2)
  return _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2), _mm512_fmadd_ps(e, _mm512_set1_ps(-1.904654299e-9f), log_m));
}
WALT_AVX512 void log_add_avx512(float* lse, const float* m, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail16(n - i);
    const __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), k, lse + i);
    _mm512_mask_storeu_ps(lse + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, m + i), log16(s)));
  }
}
WALT_AVX512 float max_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, x + j));
  }
  return _mm512_reduce_max_ps(m);
}
WALT_AVX512 float exp_sum_avx512(float* x, int64_t n, float sub) {
  const __m512 s = _mm512_set1_ps(sub);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 a = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), s));
    const __m512 b = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), s));
    _mm512_storeu_ps(x + j, a);
    _mm512_storeu_ps(x + j + 16, b);
    acc0 = _mm512_add_ps(acc0, a);
    acc1 = _mm512_add_ps(acc1, b);
  }
  for (; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    const __m512 a = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), s)));
    _mm512_mask_storeu_ps(x + j, k, a);
    acc0 = _mm512_add_ps(acc0, a);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
WALT_AVX512 void exp_avx512(float* x, int64_t n, float sub) {
  const __m512 s = _mm512_set1_ps(sub);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    _mm512_mask_storeu_ps(x + j, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), s)));
  }
}
WALT_AVX512 void scale_copy_avx512(float* dst, const float* src, int64_t n, float s) {
  const __m512 v = _mm512_set1_ps(s);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    _mm512_mask_storeu_ps(dst + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + j), v));
  }
}
WALT_AVX512 void softmax_grad_dp_avx512(float* dp, const float* p, int64_t n, float delta) {
  const __m512 d = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), d);
    _mm512_mask_storeu_ps(dp + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j), g));
  }
}
WALT_AVX512 void softmax_grad_avx512(float* p, const float* dp, int64_t n, float delta) {
  const __m512 d = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), d);
    _mm512_mask_storeu_ps(p + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j), g));
  }
}
WALT_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail16(n - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + j), _mm512_maskz_loadu_ps(k, b + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[0..n) += x[0..n) for a short run (ew = 4 to 16 in WALT's windows) in full 16-, 8- and 4-wide
// vectors, no masks: a masked load that overlaps the previous run's masked store (the next run
// starts mid-vector) cannot take its data from the store buffer and waits for the store to
// retire, which made these loops cost more than the GEMMs.
WALT_AVX512 inline void add_run(float* y, const float* x, int64_t n) {
  int64_t w = 0;
  for (; w + 16 <= n; w += 16) _mm512_storeu_ps(y + w, _mm512_add_ps(_mm512_loadu_ps(y + w), _mm512_loadu_ps(x + w)));
  if (w + 8 <= n) {
    _mm256_storeu_ps(y + w, _mm256_add_ps(_mm256_loadu_ps(y + w), _mm256_loadu_ps(x + w)));
    w += 8;
  }
  if (w + 4 <= n) {
    _mm_storeu_ps(y + w, _mm_add_ps(_mm_loadu_ps(y + w), _mm_loadu_ps(x + w)));
    w += 4;
  }
  for (; w < n; ++w) y[w] += x[w];
}
WALT_AVX512 void add_avx512(float* x, const float* b, int64_t n) { add_run(x, b, n); }
WALT_AVX512 void bias_add_avx512(float* row, const float* rev, const BiasRuns& r) {
  for (int64_t t = 0; t < r.et; ++t)
    for (int64_t h = 0; h < r.eh; ++h) add_run(row + (t * r.eh + h) * r.ew, rev + t * r.step_t + h * r.step_h, r.ew);
}
WALT_AVX512 void bias_acc_avx512(float* rev, const float* row, const BiasRuns& r) {
  for (int64_t t = 0; t < r.et; ++t)
    for (int64_t h = 0; h < r.eh; ++h) add_run(rev + t * r.step_t + h * r.step_h, row + (t * r.eh + h) * r.ew, r.ew);
}

// ---------------------------------------------------------------- AVX2 + FMA

// n = round(x log2 e) comes from the rounding of t = x log2 e + (1.5 2^23 + 127), whose low
// mantissa bits then hold n + 127: shifted into the exponent field they are 2^n, with no
// float-to-int conversion. Valid for n + 127 in [1, 255], x in [-87.3, 88.7]: below, the result is
// forced to 0 (and -inf gives 0); the inputs are logits minus their row max or logsumexp, <= 0 up
// to a rounding, so the top never binds. 5 operations fewer than clamping, rounding and
// converting n.
WALT_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
  const __m256 shift = _mm256_set1_ps(12583039.0f);  // 1.5 2^23 + 127
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2eHi), shift);
  const __m256 n = _mm256_sub_ps(t, shift);
  __m256 f = _mm256_fmsub_ps(x, _mm256_set1_ps(kLog2eHi), n);
  f = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2eLo), f);
  __m256 p = _mm256_set1_ps(kE5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE0));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

WALT_AVX2 float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

WALT_AVX2 float max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  float r = -INFINITY;
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  for (float l : lanes) r = l > r ? l : r;
  return r;
}
// Whole vectors with plain loads and stores (masked stores cost several times as much on AMD
// cores), the tail masked.
WALT_AVX2 float exp_sum_avx2(float* x, int64_t n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    const __m256 b = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), s));
    _mm256_storeu_ps(x + j, a);
    _mm256_storeu_ps(x + j + 8, b);
    acc0 = _mm256_add_ps(acc0, a);
    acc1 = _mm256_add_ps(acc1, b);
  }
  for (; j < n; j += 8) {
    const __m256i k = tail8(n - j);
    const __m256 a = _mm256_and_ps(_mm256_castsi256_ps(k), exp8(_mm256_sub_ps(_mm256_maskload_ps(x + j, k), s)));
    _mm256_maskstore_ps(x + j, k, a);
    acc0 = _mm256_add_ps(acc0, a);
  }
  return hsum8(_mm256_add_ps(acc0, acc1));
}
WALT_AVX2 void exp_avx2(float* x, int64_t n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
  if (j < n) {
    const __m256i k = tail8(n - j);
    _mm256_maskstore_ps(x + j, k, exp8(_mm256_sub_ps(_mm256_maskload_ps(x + j, k), s)));
  }
}
WALT_AVX2 void softmax_grad_avx2(float* p, const float* dp, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta);  // auto-vectorised for AVX2
}
WALT_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256i k = tail8(n - j);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + j, k), _mm256_maskload_ps(b + j, k), acc);
  }
  return hsum8(acc);
}
#endif  // __x86_64__

// The row loops and GEMM of cpu_isa(): WALT_CPU_ISA caps the choice below what the CPU offers, so
// the other code paths (including the BLAS GEMM path) can be tested on any machine.
RowOps pick() {
  const CpuIsa isa = cpu_isa();
#if defined(__x86_64__)
  if (isa == CpuIsa::avx512)
    return {"avx512f",         max_avx512,          exp_sum_avx512,         log_add_avx512,    exp_avx512,
            scale_copy_avx512, softmax_grad_avx512, softmax_grad_dp_avx512, dot_avx512,        add_avx512,
            bias_add_avx512,   bias_acc_avx512,     gemm_rows_avx512,       transpose16_avx512};
  using P = PlainRows<float>;
  if (isa == CpuIsa::avx2)
    return {"avx2",        max_avx2,          exp_sum_avx2,       P::log_add,      exp_avx2,
            P::scale_copy, softmax_grad_avx2, P::softmax_grad_dp, dot_avx2,        P::add,
            P::bias_add,   P::bias_acc,       gemm_rows_avx2,     transpose16_avx2};
#endif
  (void)isa;
  using B = PlainRows<float>;
  return {"baseline", B::max, B::exp_sum, B::log_add, B::exp, B::scale_copy, B::softmax_grad, B::softmax_grad_dp, B::dot, B::add, B::bias_add, B::bias_acc,
          nullptr, nullptr};
}

}  // namespace

const RowOps& row_ops() {
  static const RowOps ops = pick();
  return ops;
}

}  // namespace walt::attn
