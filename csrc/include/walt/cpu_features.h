// Runtime CPU feature checks for walt's dispatch between baseline, AVX2 and AVX-512 loops, and the
// one reading of WALT_CPU_ISA that both ops' CPU kernels dispatch on. Torch-free: used by the CPU
// kernels and by the C++ unit tests.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace walt {

inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_has_avx512f() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// The vector ISAs the CPU kernels are built for, narrowest first.
enum class CpuIsa : int { baseline = 0, avx2 = 1, avx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::avx512 ? "avx512f" : isa == CpuIsa::avx2 ? "avx2" : "baseline";
}

// A WALT_CPU_ISA value: baseline, avx2, or avx512 (also spelled avx512f, the CPU feature's name).
// False for anything else.
inline bool parse_cpu_isa(const char* name, CpuIsa* isa) {
  if (std::strcmp(name, "baseline") == 0) {
    *isa = CpuIsa::baseline;
  } else if (std::strcmp(name, "avx2") == 0) {
    *isa = CpuIsa::avx2;
  } else if (std::strcmp(name, "avx512") == 0 || std::strcmp(name, "avx512f") == 0) {
    *isa = CpuIsa::avx512;
  } else {
    return false;
  }
  return true;
}

// The ISA the CPU kernels use: the widest this CPU runs, capped by the environment variable
// WALT_CPU_ISA when it is set (to compare the paths or rule one out). An unknown value throws
// std::runtime_error (a RuntimeError in Python).
inline CpuIsa cpu_isa() {
  const CpuIsa supported = cpu_has_avx512f() ? CpuIsa::avx512 : cpu_has_avx2() ? CpuIsa::avx2 : CpuIsa::baseline;
  const char* cap = std::getenv("WALT_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return supported;
  CpuIsa want;
  if (!parse_cpu_isa(cap, &want)) {
    throw std::runtime_error(std::string("WALT_CPU_ISA must be one of 'baseline', 'avx2' or 'avx512', got '") + cap +
                             "'.");
  }
  return want < supported ? want : supported;
}

}  // namespace walt
