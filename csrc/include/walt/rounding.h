// Arithmetic whose rounding is pinned on every compiler: each operation rounds once, to nearest.
// On CUDA the _rn intrinsics keep --use_fast_math and FMA contraction away; host translation units
// that need the same guarantee compile these callers with -ffp-contract=off (csrc/noise/cpu.cpp
// does so by pragma). Shared by the noise generator (walt/philox.h) and the noising arithmetic
// (walt/noising.h) so CPU and CUDA produce the same bits.
#pragma once

#include <cmath>

#include "walt/macros.h"

namespace walt::rn {

#if defined(__CUDA_ARCH__)
WALT_ALWAYS_INLINE float mul(float a, float b) { return __fmul_rn(a, b); }
WALT_ALWAYS_INLINE double mul(double a, double b) { return __dmul_rn(a, b); }
WALT_ALWAYS_INLINE float add(float a, float b) { return __fadd_rn(a, b); }
WALT_ALWAYS_INLINE double add(double a, double b) { return __dadd_rn(a, b); }
WALT_ALWAYS_INLINE float sub(float a, float b) { return __fsub_rn(a, b); }
WALT_ALWAYS_INLINE double sub(double a, double b) { return __dsub_rn(a, b); }
WALT_ALWAYS_INLINE float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
WALT_ALWAYS_INLINE float sqrt(float a) { return __fsqrt_rn(a); }
#else
template <typename T>
WALT_ALWAYS_INLINE T mul(T a, T b) {
  return a * b;
}
template <typename T>
WALT_ALWAYS_INLINE T add(T a, T b) {
  return a + b;
}
template <typename T>
WALT_ALWAYS_INLINE T sub(T a, T b) {
  return a - b;
}
WALT_ALWAYS_INLINE float fma(float a, float b, float c) { return std::fma(a, b, c); }
WALT_ALWAYS_INLINE float sqrt(float a) { return std::sqrt(a); }
#endif

}  // namespace walt::rn
