// Runtime CPU feature checks for walt's dispatch between baseline, AVX2 and AVX-512 loops.
// Torch-free: used by the CPU kernels and by the C++ unit tests.
#pragma once

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

}  // namespace walt
