// Portability macros for the torch-free headers shared by CPU (g++) and CUDA (nvcc) code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define WALT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define WALT_HOST_DEVICE inline
#endif

// Like WALT_HOST_DEVICE, but host code is always inlined too: a loop built for AVX2/AVX-512 by
// a target attribute only vectorizes what it inlines, and a target-specific caller may always
// inline a generic callee.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define WALT_ALWAYS_INLINE WALT_HOST_DEVICE
#else
#define WALT_ALWAYS_INLINE inline __attribute__((always_inline))
#endif
