// walt/noising.h on its own: the x_t / target arithmetic the CPU and CUDA noise kernels share.
#include "walt/noising.h"

#include <cmath>
#include <cstdio>

#include "check.h"

namespace {

template <typename T>
void check_type() {
  const T x0 = T(0.8125), eps = T(-1.3125);
  // zero terminal SNR (ab = 0): a = 0, s = 1 gives x_t = eps and v = -x0 exactly
  WALT_CHECK(walt::noisy_sample(T(0), T(1), x0, eps) == eps);
  WALT_CHECK((walt::noise_target<walt::NoiseTarget::v>(T(0), T(1), x0, eps)) == -x0);
  // ab = 1: x_t = x0, v = eps
  WALT_CHECK(walt::noisy_sample(T(1), T(0), x0, eps) == x0);
  WALT_CHECK((walt::noise_target<walt::NoiseTarget::v>(T(1), T(0), x0, eps)) == eps);
  // the other targets pass their input through
  WALT_CHECK((walt::noise_target<walt::NoiseTarget::eps>(T(0.3), T(0.7), x0, eps)) == eps);
  WALT_CHECK((walt::noise_target<walt::NoiseTarget::x0>(T(0.3), T(0.7), x0, eps)) == x0);
  // a general step: the formulas, with every product rounded before the sum
  const T a = std::sqrt(T(0.3)), s = std::sqrt(T(1) - T(0.3));
  volatile T ax = a * x0, se = s * eps, ae = a * eps, sx = s * x0;  // volatile: rounded to T
  WALT_CHECK(walt::noisy_sample(a, s, x0, eps) == T(ax + se));
  WALT_CHECK(walt::velocity(a, s, x0, eps) == T(ae - sx));
}

}  // namespace

int main() {
  check_type<float>();
  check_type<double>();
  std::printf("noising: ok\n");
  return 0;
}
