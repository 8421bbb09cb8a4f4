// CUDA registration of walt::add_noise: the checks every device shares (checks.h), then the
// torch-free launcher (cuda/launch.h). Compiled only when the extension is built with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.h"

namespace walt::noise {
namespace {

DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kDouble:
      return DType::f64;
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK(false, "add_noise: x0 must be float64, float32, bfloat16 or float16, got ", s, ".");
  }
}

std::tuple<at::Tensor, at::Tensor> add_noise_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                  const at::Tensor& alphas_cumprod, int64_t seed,
                                                  const std::optional<at::Tensor>& keys,
                                                  const std::optional<at::Tensor>& noise, c10::string_view target) {
  const AddNoiseArgs args = check_args(x0, t, alphas_cumprod, seed, keys, noise, target);
  const c10::cuda::CUDAGuard guard(x0.device());
  at::Tensor x_t = at::empty(x0.sizes(), x0.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor tgt = at::empty(x0.sizes(), x0.options().memory_format(at::MemoryFormat::Contiguous));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x0.device().index()));
  const int64_t batch = args.x0.size(0);
  cuda::AddNoiseParams p;
  p.dtype = kernel_dtype(args.x0.scalar_type());
  p.x0 = args.x0.const_data_ptr();
  p.noise = args.noise ? args.noise->const_data_ptr() : nullptr;
  p.a = args.a.const_data_ptr();
  p.s = args.s.const_data_ptr();
  p.keys = args.keys ? args.keys->const_data_ptr<int64_t>() : nullptr;
  p.seed = args.seed;
  p.batch = batch;
  p.per_sample = batch == 0 ? 0 : args.x0.numel() / batch;
  p.target = args.target;
  p.x_t = x_t.mutable_data_ptr();
  p.target_out = tgt.mutable_data_ptr();
  p.num_sms = sms;
  C10_CUDA_CHECK(cuda::launch_add_noise(p, c10::cuda::getCurrentCUDAStream()));
  return {x_t, tgt};
}

}  // namespace
}  // namespace walt::noise

TORCH_LIBRARY_IMPL(walt, CUDA, m) { m.impl("add_noise", &walt::noise::add_noise_cuda); }
