// Argument checks of walt::add_noise (checks.h), shared by every device's registration. Mistakes
// of value (shapes, devices, ranges, the target) raise c10::ValueError, of type (dtypes)
// c10::TypeError: Python sees ValueError and TypeError.
#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace walt::noise {
namespace {

bool is_x0_dtype(at::ScalarType d) {
  return d == at::kDouble || d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

NoiseTarget parse_target(c10::string_view target) {
  if (target == "v") return NoiseTarget::v;
  if (target == "eps") return NoiseTarget::eps;
  if (target == "x0") return NoiseTarget::x0;
  TORCH_CHECK_VALUE(false, "add_noise: target must be 'v', 'eps' or 'x0', got '", std::string(target), "'.");
}

}  // namespace

// Every check the op makes, for any device: one sentence naming the argument and what was expected.
AddNoiseArgs check_args(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& alphas_cumprod, int64_t seed,
                        const std::optional<at::Tensor>& keys, const std::optional<at::Tensor>& noise,
                        c10::string_view target) {
  TORCH_CHECK_VALUE(x0.dim() >= 1, "add_noise: x0 must have a leading batch dimension (B, ...), got a 0-d tensor.");
  TORCH_CHECK_TYPE(is_x0_dtype(x0.scalar_type()), "add_noise: x0 must be float64, float32, bfloat16 or float16, got ",
                   x0.scalar_type(), ".");
  const int64_t B = x0.size(0);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, "add_noise: t must have shape (B,) = (", B,
                    ",), one timestep per sample of x0, got shape ", t.sizes(), ".");
  TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false),
                   "add_noise: t must be an integer tensor of timestep indices, got ", t.scalar_type(), ".");
  TORCH_CHECK_VALUE(t.device() == x0.device(), "add_noise: t must be on x0's device ", x0.device(), ", got ",
                    t.device(), ".");
  TORCH_CHECK_VALUE(
      alphas_cumprod.dim() == 1 && alphas_cumprod.size(0) >= 1,
      "add_noise: alphas_cumprod must be a non-empty 1-D tensor (the cumulative-product table), got shape ",
      alphas_cumprod.sizes(), ".");
  TORCH_CHECK_TYPE(at::isFloatingType(alphas_cumprod.scalar_type()),
                   "add_noise: alphas_cumprod must be a floating-point tensor, got ", alphas_cumprod.scalar_type(),
                   ".");
  TORCH_CHECK_VALUE(alphas_cumprod.device() == x0.device(), "add_noise: alphas_cumprod must be on x0's device ",
                    x0.device(), ", got ", alphas_cumprod.device(), ".");
  if (keys) {
    TORCH_CHECK_VALUE(keys->dim() == 1 && keys->size(0) == B, "add_noise: keys must have shape (B,) = (", B,
                      ",), one noise key per sample of x0, got shape ", keys->sizes(), ".");
    TORCH_CHECK_TYPE(at::isIntegralType(keys->scalar_type(), /*includeBool=*/false),
                     "add_noise: keys must be an integer tensor, got ", keys->scalar_type(), ".");
    TORCH_CHECK_VALUE(keys->device() == x0.device(), "add_noise: keys must be on x0's device ", x0.device(), ", got ",
                      keys->device(), ".");
  }
  if (noise) {
    TORCH_CHECK_VALUE(noise->sizes() == x0.sizes(), "add_noise: noise must have x0's shape ", x0.sizes(), ", got ",
                      noise->sizes(), ".");
    TORCH_CHECK_TYPE(noise->scalar_type() == x0.scalar_type(), "add_noise: noise must have x0's dtype ",
                     x0.scalar_type(), ", got ", noise->scalar_type(), ".");
    TORCH_CHECK_VALUE(noise->device() == x0.device(), "add_noise: noise must be on x0's device ", x0.device(), ", got ",
                      noise->device(), ".");
  }
  const NoiseTarget tgt = parse_target(target);
  {  // sqrt(ab) and sqrt(1 - ab) are NaN outside [0, 1]: refuse the table rather than return NaN
    const auto [lo, hi] = at::aminmax(alphas_cumprod);
    const double amin = lo.item<double>(), amax = hi.item<double>();
    const bool has_nan = std::isnan(amin) || std::isnan(amax);
    TORCH_CHECK_VALUE(!has_nan && amin >= 0 && amax <= 1, "add_noise: alphas_cumprod must lie in [0, 1] (a cumulative ",
                      "product of 1 - beta), got ",
                      has_nan ? std::string("NaN") : c10::str("values in [", amin, ", ", amax, "]"), ".");
  }

  const int64_t steps = alphas_cumprod.size(0);
  at::Tensor t64 = t.to(at::kLong).contiguous();
  if (B > 0) {
    const auto [lo, hi] = at::aminmax(t64);
    const int64_t tmin = lo.item<int64_t>(), tmax = hi.item<int64_t>();
    TORCH_CHECK_VALUE(tmin >= 0 && tmax < steps, "add_noise: every t must index alphas_cumprod, i.e. lie in [0, ",
                      steps, "), got values in [", tmin, ", ", tmax, "].");
  }
  // a and s as diffusers computes them: the table cast to x0's compute dtype (float32, or float64
  // for float64 x0), indexed, then `** 0.5` with torch's own kernels. torch's vectorized float32
  // sqrt is not always correctly rounded, so a hand-written sqrt would differ from diffusers in
  // the last bit for some timesteps.
  const at::ScalarType compute = x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor ab = alphas_cumprod.to(compute).index_select(0, t64);
  return AddNoiseArgs{x0.contiguous(),
                      ab.pow(0.5).contiguous(),
                      (1 - ab).pow(0.5).contiguous(),
                      static_cast<uint64_t>(seed),
                      keys ? std::optional<at::Tensor>(keys->to(at::kLong).contiguous()) : std::nullopt,
                      noise ? std::optional<at::Tensor>(noise->contiguous()) : std::nullopt,
                      tgt};
}

}  // namespace walt::noise
