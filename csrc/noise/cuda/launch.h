// Torch-free launcher of the CUDA noise kernel (add_noise.cu): the .cu file compiles with nvcc
// alone (`make cuda-compile`), and op_cuda.cpp (built only with CUDA) feeds it from tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "walt/dtype.h"
#include "walt/noising.h"

namespace walt::noise::cuda {

struct AddNoiseParams {
  DType dtype;                  // of x0, noise, x_t and target
  const void* x0;               // contiguous (batch, per_sample)
  const void* noise;            // like x0, or nullptr to draw Philox normals
  const void* a;                // sqrt(ab[t]) per sample (batch,): double for f64, float otherwise
  const void* s;                // sqrt(1 - ab[t]) per sample, likewise
  const int64_t* keys;          // (batch,) or nullptr for keys 0..batch-1
  uint64_t seed;
  int64_t batch, per_sample;
  NoiseTarget target;
  void* x_t;                    // contiguous, like x0
  void* target_out;             // contiguous, like x0
  int num_sms;                  // sizes the grid
};

// Enqueues the kernel on `stream`; returns the launch status.
cudaError_t launch_add_noise(const AddNoiseParams& p, cudaStream_t stream);

}  // namespace walt::noise::cuda
