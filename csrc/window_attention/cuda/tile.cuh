// Warp-level building blocks of the tensor-core window-attention kernels (sm_80+): asynchronous
// 16-byte gathers of window rows into shared memory, ldmatrix loads and m16n8k16 MMAs with float32
// accumulation, for float16 and bfloat16. The instructions are CuTe's architecture atoms (CUTLASS
// headers): SM80_CP_ASYNC_CACHEGLOBAL_ZFILL with cute::cp_async_fence / cp_async_wait,
// SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T (ldmatrix x4 and x4.trans), and
// SM80_16x8x16_F32{F16F16,BF16BF16}F32_TN (mma.sync m16n8k16, row.col, f32 accumulators). Two
// details are CuTe's: its cp.async carries the .L2::128B prefetch hint, and cp_async_wait<0> is
// cp.async.wait_all (an empty commit, then a wait for every group). The window index math (tasks,
// token offsets, bias positions) is walt/window_geometry.h's, called with int token indices.
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane = 4 g + c:
//   A (16x16, row): a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   B (16x8,  col): b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C (16x8, f32) : c0,c1 = C[g][2c..2c+1], c2,c3 = C[g+8][2c..2c+1]
// So the C fragments of two adjacent 8-column tiles, packed to 16 bits, are the A fragment of the
// next product: P never leaves registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "launch.h"
#include "walt/constants.h"
#include "walt/cuda_convert.cuh"
#include "walt/window_geometry.h"

namespace walt::attn::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = 64;  // query rows per CTA (16 per warp) and keys per step
constexpr int kPad = 8;        // elements of padding per shared row: ldmatrix rows hit distinct banks

// One 16-byte chunk (8 elements), the unit of cp.async and of an ldmatrix row address.
using Chunk = cute::uint128_t;

// D = A B + C with D = C (accumulate in place). A: four registers, B: two, C: four floats.
template <typename Elem>
using Mma16816 = std::conditional_t<std::is_same_v<Elem, __half>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                    cute::SM80_16x8x16_F32BF16BF16F32_TN>;

template <typename Elem>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<Elem, __half> || std::is_same_v<Elem, __nv_bfloat16>);
  Mma16816<Elem>::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}

// Two floats -> one register of two 16-bit values, the first in the low half.
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// A fragment of rows [row0, row0+16) x cols [col0, col0+16) of a row-major shared tile.
template <typename Elem>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Elem* tile, int ld, int row0, int col0, int lane) {
  const Elem* p = tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8;
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const Chunk*>(p), a[0], a[1], a[2], a[3]);
}

// B fragments of two adjacent 8-column tiles for B = X^T, X row-major in shared memory with
// rows = B's columns (n) and cols = B's rows (k): rows [n0, n0+16) x cols [k0, k0+16).
// b[0], b[1] serve columns n0..n0+7; b[2], b[3] serve n0+8..n0+15.
template <typename Elem>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const Elem* tile, int ld, int n0, int k0, int lane) {
  const Elem* p = tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const Chunk*>(p), b[0], b[1], b[2], b[3]);
}

// B fragments of two adjacent 8-column tiles for B = X, X row-major in shared memory with
// rows = B's rows (k) and cols = B's columns (n): rows [k0, k0+16) x cols [n0, n0+16).
template <typename Elem>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const Elem* tile, int ld, int k0, int n0, int lane) {
  const Elem* p = tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const Chunk*>(p), b[0], b[1], b[2], b[3]);
}

// Gathers rows [row0, row0 + kTileRows) of a window (rows >= n are zero) into a shared tile of
// kTileRows x (D + kPad) elements, one 16-byte cp.async per thread per step.
template <typename Elem, int D>
__device__ __forceinline__ void gather_rows(Elem* tile, const Elem* base, const WindowExtent& e, int row0,
                                            const TokenStrides& s, int64_t b, int64_t head) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kTileRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int local = row0 + r;
    const bool valid = local < e.n;
    const Elem* src = valid ? base + token_offset(e, local, s, b) + head * s.head + c * 8 : base;
    // 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
    Chunk& dst = *reinterpret_cast<Chunk*>(tile + r * (D + kPad) + c * 8);
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<Chunk>::copy(*reinterpret_cast<const Chunk*>(src), dst, valid);
  }
}

}  // namespace walt::attn::cuda
