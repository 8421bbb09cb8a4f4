// Device-side conversions between float and the 16-bit types, shared by the CUDA kernels. Spelled
// out because torch builds CUDA code with the implicit half conversions disabled
// (__CUDA_NO_HALF_CONVERSIONS__ and friends). convert<To>(x) is static_cast where C++ allows it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace walt {

template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  return static_cast<To>(x);
}
template <>
__device__ __forceinline__ float convert<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float convert<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ __half convert<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace walt
