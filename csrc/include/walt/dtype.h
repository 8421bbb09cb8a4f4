// Element types the kernels understand, named without torch so that torch-free launchers (the
// CUDA .cu files) can be told what a buffer holds. The torch-facing glue maps at::ScalarType here.
#pragma once

namespace walt {

enum class DType : int { f64 = 0, f32 = 1, f16 = 2, bf16 = 3 };

}  // namespace walt
