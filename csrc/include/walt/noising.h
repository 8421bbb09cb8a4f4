// Forward-diffusion arithmetic shared by the CPU and CUDA noise kernels. Torch-free, C++17.
//
//   x_t = a x0 + s eps,  v = a eps - s x0,  a = sqrt(ab[t]), s = sqrt(1 - ab[t])
//
// Each product is rounded on its own before the sum, exactly as diffusers'
// DDPMScheduler.add_noise / get_velocity compute it with separate tensor ops, so with the same eps
// the results are bitwise equal. That needs the compiler not to fuse a*x + s*e into an FMA
// (walt/rounding.h: the _rn intrinsics on CUDA, -ffp-contract=off in host callers).
#pragma once

#include "walt/macros.h"
#include "walt/rounding.h"

namespace walt {

// What add_noise returns next to x_t.
enum class NoiseTarget : int { v = 0, eps = 1, x0 = 2 };


// x_t = a x0 + s eps
template <typename T>
WALT_HOST_DEVICE T noisy_sample(T a, T s, T x0, T eps) {
  return rn::add(rn::mul(a, x0), rn::mul(s, eps));
}

// v = a eps - s x0 (Salimans & Ho 2022)
template <typename T>
WALT_HOST_DEVICE T velocity(T a, T s, T x0, T eps) {
  return rn::sub(rn::mul(a, eps), rn::mul(s, x0));
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
