// Argument checks of walt::add_noise (checks.cpp), shared by every device's registration (op.cpp,
// op_cuda.cpp): each user mistake ends in one sentence naming the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "walt/noising.h"

namespace walt::noise {

// Validated, normalized arguments of walt::add_noise.
struct AddNoiseArgs {
  at::Tensor x0;              // contiguous, (B, ...)
  at::Tensor a;               // sqrt(alphas_cumprod[t]), (B,), contiguous, in x0's compute dtype
  at::Tensor s;               // sqrt(1 - alphas_cumprod[t]), likewise
  uint64_t seed;
  std::optional<at::Tensor> keys;   // (B,), converted to int64, contiguous
  std::optional<at::Tensor> noise;  // contiguous, like x0
  NoiseTarget target;
};

// Checks the op's arguments and normalizes them for a kernel. Each mistake raises c10::ValueError or
// c10::TypeError (Python's ValueError and TypeError) with one sentence. Python checks only what
// cannot reach here: the arguments' types, the seed's range and a schedule that requires grad
// (walt/ops/noise.py).
AddNoiseArgs check_args(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& alphas_cumprod, int64_t seed,
                        const std::optional<at::Tensor>& keys, const std::optional<at::Tensor>& noise,
                        c10::string_view target);

}  // namespace walt::noise
