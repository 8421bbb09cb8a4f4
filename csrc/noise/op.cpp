// Schema and CPU registration of walt::add_noise: the shared argument checks (checks.h), then the
// CPU kernel (cpu.h). Autograd and the fake kernel live in walt/ops/noise.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu.h"

namespace walt::noise {
namespace {

std::tuple<at::Tensor, at::Tensor> add_noise_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                 const at::Tensor& alphas_cumprod, int64_t seed,
                                                 const std::optional<at::Tensor>& keys,
                                                 const std::optional<at::Tensor>& noise, c10::string_view target) {
  const AddNoiseArgs args = check_args(x0, t, alphas_cumprod, seed, keys, noise, target);
  at::Tensor x_t = at::empty(x0.sizes(), x0.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor tgt = at::empty(x0.sizes(), x0.options().memory_format(at::MemoryFormat::Contiguous));
  add_noise_cpu_kernel(args, x_t, tgt);
  return {x_t, tgt};
}

}  // namespace
}  // namespace walt::noise

TORCH_LIBRARY_FRAGMENT(walt, m) {
  m.def(
      "add_noise(Tensor x0, Tensor t, Tensor alphas_cumprod, int seed, Tensor? keys, Tensor? noise, str target)"
      " -> (Tensor x_t, Tensor target)");
}

TORCH_LIBRARY_IMPL(walt, CPU, m) { m.impl("add_noise", &walt::noise::add_noise_cpu); }
