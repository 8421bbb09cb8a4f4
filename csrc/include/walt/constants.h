// Floating-point constants shared by the CPU and CUDA kernels (torch-free; usable in device code).
#pragma once

namespace walt {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e), rounded to float
constexpr float kLn2 = 0.6931471805599453f;    // ln(2), rounded to float

}  // namespace walt
