// Portability macros for the torch-free headers shared by CPU (g++) and CUDA (nvcc) code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define WALT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define WALT_HOST_DEVICE inline
#endif
