// Forward-diffusion arithmetic shared by the CPU and CUDA noise kernels. Torch-free, C++17.
//
//   x_t = a x0 + s eps,  v = a eps - s x0,  a = sqrt(ab[t]), s = sqrt(1 - ab[t])
//
// Each product is rounded on its own before the sum, exactly as diffusers'
// DDPMScheduler.add_noise / get_velocity compute it with separate tensor ops, so with the same eps
// the results are bitwise equal. That needs the compiler not to fuse a*x + s*e into an FMA: the
// CUDA path pins it with __fmul_rn/__fadd_rn; host translation units that include this header
// must compile these functions with -ffp-contract=off (csrc/noise/cpu.cpp does so by pragma).
#pragma once

#include "walt/macros.h"

namespace walt {

// What add_noise returns next to x_t.
enum class NoiseTarget : int { v = 0, eps = 1, x0 = 2 };

namespace noising_detail {

WALT_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
WALT_HOST_DEVICE double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
WALT_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
WALT_HOST_DEVICE double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
WALT_HOST_DEVICE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
WALT_HOST_DEVICE double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

}  // namespace noising_detail

// x_t = a x0 + s eps
template <typename T>
WALT_HOST_DEVICE T noisy_sample(T a, T s, T x0, T eps) {
  using namespace noising_detail;
  return add(mul(a, x0), mul(s, eps));
}

// v = a eps - s x0 (Salimans & Ho 2022)
template <typename T>
WALT_HOST_DEVICE T velocity(T a, T s, T x0, T eps) {
  using namespace noising_detail;
  return sub(mul(a, eps), mul(s, x0));
}

template <NoiseTarget target, typename T>
WALT_HOST_DEVICE T noise_target(T a, T s, T x0, T eps) {
  if constexpr (target == NoiseTarget::v) {
    return velocity(a, s, x0, eps);
  } else if constexpr (target == NoiseTarget::eps) {
    return eps;
  } else {
    return x0;
  }
}

}  // namespace walt
