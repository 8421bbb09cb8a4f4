// CUDA kernel of walt::add_noise (torch-free; launch.h is its interface, op_cuda.cpp registers it).
//
// One thread per Philox block (4 consecutive elements of one sample): it draws the block's four
// normals with the same header the CPU kernel uses (walt/philox.h), so CPU and CUDA give the same
// eps for the same (seed, key, element index), and writes x_t and the target with 4-element
// accesses where the layout allows. The per-sample coefficients a, s come from the shared checks
// (checks.cpp; computed by torch, as diffusers computes them) and walt/noising.h pins every
// rounding, so an explicit eps gives the same bits as diffusers' add_noise / get_velocity.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"
#include "walt/cuda_convert.cuh"
#include "walt/philox.h"

namespace walt::noise::cuda {
namespace {

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

// Four consecutive elements, loaded or stored in one access when aligned.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <NoiseTarget target, typename T, bool kGenerate, bool kVector>
__global__ void add_noise_kernel(const T* __restrict__ x0, const T* __restrict__ noise,
                                 const typename Compute<T>::type* __restrict__ coef_a,
                                 const typename Compute<T>::type* __restrict__ coef_s, const int64_t* __restrict__ keys,
                                 uint64_t seed, int64_t batch, int64_t per_sample, T* __restrict__ x_t,
                                 T* __restrict__ tgt) {
  using acc_t = typename Compute<T>::type;
  const int64_t blocks_per_sample = (per_sample + 3) / 4;
  const int64_t total = batch * blocks_per_sample;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t b = idx / blocks_per_sample;
    const int64_t block = idx - b * blocks_per_sample;
    const acc_t a = coef_a[b], s = coef_s[b];
    const int64_t base = b * per_sample + 4 * block;
    const int n = per_sample - 4 * block < 4 ? static_cast<int>(per_sample - 4 * block) : 4;

    acc_t x[4], e[4];
    if constexpr (kVector) {  // per_sample % 4 == 0 and 4-element-aligned pointers: n == 4
      const Pack4<T> xv = *reinterpret_cast<const Pack4<T>*>(x0 + base);
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = convert<acc_t>(xv.v[j]);
      if constexpr (!kGenerate) {
        const Pack4<T> nv = *reinterpret_cast<const Pack4<T>*>(noise + base);
#pragma unroll
        for (int j = 0; j < 4; ++j) e[j] = convert<acc_t>(nv.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[j] = j < n ? convert<acc_t>(x0[base + j]) : acc_t(0);
        if constexpr (!kGenerate) e[j] = j < n ? convert<acc_t>(noise[base + j]) : acc_t(0);
      }
    }
    if constexpr (kGenerate) {
      const uint64_t key = keys != nullptr ? static_cast<uint64_t>(keys[b]) : static_cast<uint64_t>(b);
      const normal4 g = philox_normal4(seed, key, static_cast<uint64_t>(block));
#pragma unroll
      for (int j = 0; j < 4; ++j) e[j] = static_cast<acc_t>(g.v[j]);
    }

    Pack4<T> xo, to;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      xo.v[j] = convert<T>(noisy_sample(a, s, x[j], e[j]));
      to.v[j] = convert<T>(noise_target<target>(a, s, x[j], e[j]));
    }
    if constexpr (kVector) {
      *reinterpret_cast<Pack4<T>*>(x_t + base) = xo;
      *reinterpret_cast<Pack4<T>*>(tgt + base) = to;
    } else {
      for (int j = 0; j < n; ++j) {
        x_t[base + j] = xo.v[j];
        tgt[base + j] = to.v[j];
      }
    }
  }
}

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <NoiseTarget target, typename T>
cudaError_t launch_typed(const AddNoiseParams& p, cudaStream_t stream) {
  using acc_t = typename Compute<T>::type;
  const int64_t total = p.batch * ((p.per_sample + 3) / 4);
  if (total == 0) return cudaSuccess;
  const size_t pack = 4 * sizeof(T);
  const bool vector = p.per_sample % 4 == 0 && aligned(p.x0, pack) && aligned(p.noise, pack) &&
                      aligned(p.x_t, pack) && aligned(p.target_out, pack);
  constexpr int kThreads = 256;
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const int64_t resident = static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 1) * 16;  // the loop strides past this
  const unsigned grid = static_cast<unsigned>(wanted < resident ? wanted : resident);

  const auto* x0 = static_cast<const T*>(p.x0);
  const auto* noise = static_cast<const T*>(p.noise);
  const auto* coef_a = static_cast<const acc_t*>(p.a);
  const auto* coef_s = static_cast<const acc_t*>(p.s);
  auto* x_t = static_cast<T*>(p.x_t);
  auto* tgt = static_cast<T*>(p.target_out);
  const auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(x0, noise, coef_a, coef_s, p.keys, p.seed, p.batch, p.per_sample, x_t,
                                          tgt);
  };
  if (noise == nullptr) {
    vector ? go(add_noise_kernel<target, T, true, true>) : go(add_noise_kernel<target, T, true, false>);
  } else {
    vector ? go(add_noise_kernel<target, T, false, true>) : go(add_noise_kernel<target, T, false, false>);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_target(const AddNoiseParams& p, cudaStream_t stream) {
  switch (p.target) {
    case NoiseTarget::v:
      return launch_typed<NoiseTarget::v, T>(p, stream);
    case NoiseTarget::eps:
      return launch_typed<NoiseTarget::eps, T>(p, stream);
    case NoiseTarget::x0:
      return launch_typed<NoiseTarget::x0, T>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_add_noise(const AddNoiseParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f64:
      return launch_target<double>(p, stream);
    case DType::f32:
      return launch_target<float>(p, stream);
    case DType::f16:
      return launch_target<__half>(p, stream);
    case DType::bf16:
      return launch_target<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace walt::noise::cuda
