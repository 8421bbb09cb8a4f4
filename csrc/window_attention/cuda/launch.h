// Torch-free launchers of the CUDA window-attention kernels; op_cuda.cpp feeds them from tensors.
//
// Layout: q, k, v, grad_out are (B, T, H, W, heads, d) with any element strides (unit stride on d,
// every other stride and the base pointer 16-byte aligned); out, dq, dk, dv and lse are written
// with the strides given. Tensor-core kernels take float16 and bfloat16 with float32 accumulation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "walt/dtype.h"
#include "walt/window_geometry.h"

namespace walt::attn::cuda {

struct ForwardParams {
  DType dtype;  // f16 or bf16
  const void *q, *k, *v;
  TokenStrides sq, sk, sv;
  void* out;
  TokenStrides so;
  float* lse;       // natural-log logsumexp per query, (B, T, H, W, heads) contiguous
  const float* bias;  // (heads, bias_table_size(geo)) contiguous float32, or nullptr
  WindowGeometry geo;
  int64_t batch, heads;
  int head_dim;  // 32, 64, 96 or 128
  float scale;
};

struct BackwardParams {
  ForwardParams fwd;  // the forward's inputs, out and lse
  const void* grad_out;
  TokenStrides sdo;
  const float* delta;  // rowsum(grad_out * out) per query, like lse
  void *dq, *dk, *dv;  // written with the strides below
  TokenStrides sdq, sdk, sdv;
  float* dq_accum;       // scratch: batch * windows * heads * max_window_tokens * head_dim floats
  float* dbias_partial;  // scratch: batch * windows * heads * 4 * bias_table_size floats, or nullptr
  float* dbias;          // (heads, bias_table_size) float32 output, or nullptr
};

bool supported_head_dim(int d);

cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream);
cudaError_t launch_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace walt::attn::cuda
