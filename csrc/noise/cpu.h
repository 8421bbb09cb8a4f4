// CPU entry point of walt::add_noise (cpu.cpp); op.cpp checks the arguments and registers it.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace walt::noise {

// x_t and the target into the preallocated contiguous outputs.
void add_noise_cpu_kernel(const AddNoiseArgs& args, at::Tensor& x_t, at::Tensor& target);

}  // namespace walt::noise
