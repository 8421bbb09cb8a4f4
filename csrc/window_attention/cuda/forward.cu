// Forward of fused 3D window attention on tensor cores (flash-attention-2 style, sm_80+).
//
// One CTA of 4 warps per (batch, window, head, tile of 64 query rows); each warp owns 16 query
// rows. The window's rows are gathered straight from q, k, v (any token strides) into padded
// shared tiles with cp.async: the gather is the tile load, so no partitioned copy exists. Keys
// stream through in tiles of 64: S = Q K^T on tensor cores, scale and relative-position bias added
// in registers, keys past the window's valid extent masked, online softmax in float32 (exp2
// domain), then O += P V with P kept in registers. The epilogue divides by the row sum, scatters
// the rows back to the token layout and stores the logsumexp for the backward pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "tile.cuh"

namespace walt::attn::cuda {
namespace {

template <typename Elem, int D>
constexpr int forward_smem_bytes() {
  return 3 * kTileRows * (D + kPad) * int(sizeof(Elem)) + kTileRows * int(sizeof(int));
}

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams p) {
  constexpr int LD = D + kPad;
  constexpr int kNT = kTileRows / 8;  // 8-wide key tiles of S per warp
  constexpr int kDT = D / 8;          // 8-wide column tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem[];
  Elem* sQ = reinterpret_cast<Elem*>(smem);
  Elem* sK = sQ + kTileRows * LD;
  Elem* sV = sK + kTileRows * LD;
  int* sKeyPos = reinterpret_cast<int*>(sV + kTileRows * LD);

  const WindowGeometry& geo = p.geo;
  const int64_t windows = num_windows(geo);
  const int64_t q_tiles = (max_window_tokens(geo) + kTileRows - 1) / kTileRows;
  const int64_t q_tile = blockIdx.x % q_tiles;
  const WindowTask task = decode_task(blockIdx.x / q_tiles, p.heads, windows);
  const WindowExtent e = window_extent(geo, task.win);
  const int n = static_cast<int>(e.n);
  const int m0 = static_cast<int>(q_tile) * kTileRows;
  if (m0 >= n) return;  // a partial window has fewer query tiles than a full one

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const Elem* q = static_cast<const Elem*>(p.q);
  const Elem* k = static_cast<const Elem*>(p.k);
  const Elem* v = static_cast<const Elem*>(p.v);

  gather_rows<Elem, D>(sQ, q, e, m0, p.sq, task.b, task.head);
  cute::cp_async_fence();

  // This thread's two query rows (g and g+8 of the warp's 16) and their bias positions.
  const int row_a = m0 + warp * 16 + g, row_b = row_a + 8;
  const float* bias = p.bias != nullptr ? p.bias + task.head * bias_table_size(geo) : nullptr;
  const int center = static_cast<int>(bias_center(geo));
  const int pos_a = row_a < n ? bias_pos(geo, e, row_a) + center : 0;
  const int pos_b = row_b < n ? bias_pos(geo, e, row_b) + center : 0;
  const float scale_log2 = p.scale * kLog2e;

  float o[kDT][4];
#pragma unroll
  for (int j = 0; j < kDT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float max_a = -INFINITY, max_b = -INFINITY, sum_a = 0.f, sum_b = 0.f;
  uint32_t qf[D / 16][4];

  for (int n0 = 0; n0 < n; n0 += kTileRows) {
    __syncthreads();  // every warp is done with the previous K, V tiles
    gather_rows<Elem, D>(sK, k, e, n0, p.sk, task.b, task.head);
    cute::cp_async_fence();
    gather_rows<Elem, D>(sV, v, e, n0, p.sv, task.b, task.head);
    cute::cp_async_fence();
    for (int i = threadIdx.x; i < kTileRows; i += kThreads)
      sKeyPos[i] = n0 + i < n ? bias_pos(geo, e, n0 + i) : 0;
    cute::cp_async_wait<1>();  // Q and K have landed; V may still be in flight
    __syncthreads();
    if (n0 == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], sQ, LD, warp * 16, kk * 16, lane);
    }

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        uint32_t bf[4];
        load_b_rows(bf, sK, LD, j * 8, kk * 16, lane);
        mma_16816<Elem>(s[j], qf[kk], bf[0], bf[1]);
        mma_16816<Elem>(s[j + 1], qf[kk], bf[2], bf[3]);
      }
    }

    // Logits in the log2 domain: scale, bias, mask; then the running max of each row.
    float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = j * 8 + 2 * c + h;
        const bool valid = n0 + col < n;
        float la = s[j][h] * scale_log2, lb = s[j][2 + h] * scale_log2;
        if (bias != nullptr && valid) {
          const int kp = sKeyPos[col];
          la += __ldg(bias + pos_a - kp) * kLog2e;
          lb += __ldg(bias + pos_b - kp) * kLog2e;
        }
        s[j][h] = valid ? la : -INFINITY;
        s[j][2 + h] = valid ? lb : -INFINITY;
        tile_max_a = fmaxf(tile_max_a, s[j][h]);
        tile_max_b = fmaxf(tile_max_b, s[j][2 + h]);
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(0xffffffffu, tile_max_a, off));
      tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(0xffffffffu, tile_max_b, off));
    }
    const float new_max_a = fmaxf(max_a, tile_max_a), new_max_b = fmaxf(max_b, tile_max_b);
    // A row whose logits are all -inf so far keeps exponent base 0 so exp2 gives 0, not NaN.
    const float base_a = new_max_a == -INFINITY ? 0.f : new_max_a;
    const float base_b = new_max_b == -INFINITY ? 0.f : new_max_b;
    const float rescale_a = exp2f(max_a - base_a), rescale_b = exp2f(max_b - base_b);
    max_a = new_max_a;
    max_b = new_max_b;
    sum_a *= rescale_a;
    sum_b *= rescale_b;
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
      o[j][0] *= rescale_a;
      o[j][1] *= rescale_a;
      o[j][2] *= rescale_b;
      o[j][3] *= rescale_b;
    }
    uint32_t pf[kTileRows / 16][4];  // P as A fragments of P V
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float p0 = exp2f(s[j][0] - base_a), p1 = exp2f(s[j][1] - base_a);
      const float p2 = exp2f(s[j][2] - base_b), p3 = exp2f(s[j][3] - base_b);
      sum_a += p0 + p1;
      sum_b += p2 + p3;
      pf[j / 2][(j % 2) * 2] = pack2<Elem>(p0, p1);
      pf[j / 2][(j % 2) * 2 + 1] = pack2<Elem>(p2, p3);
    }

    cute::cp_async_wait<0>();  // V has landed
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileRows / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < kDT; j += 2) {
        uint32_t bf[4];
        load_b_cols(bf, sV, LD, kk * 16, j * 8, lane);
        mma_16816<Elem>(o[j], pf[kk], bf[0], bf[1]);
        mma_16816<Elem>(o[j + 1], pf[kk], bf[2], bf[3]);
      }
    }
  }

#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    sum_a += __shfl_xor_sync(0xffffffffu, sum_a, off);
    sum_b += __shfl_xor_sync(0xffffffffu, sum_b, off);
  }
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? row_a : row_b;
    if (row >= n) continue;
    const float sum = r == 0 ? sum_a : sum_b;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    Elem* dst = out + token_offset(e, row, p.so, task.b) + task.head * p.so.head;
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
      *reinterpret_cast<uint32_t*>(dst + j * 8 + 2 * c) = pack2<Elem>(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
    }
    if (c == 0) {
      const float mx = r == 0 ? max_a : max_b;
      p.lse[token_index(geo, e, row, task.b) * p.heads + task.head] =
          sum > 0.f ? (mx + __log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

template <typename Elem, int D>
cudaError_t launch_forward_typed(const ForwardParams& p, cudaStream_t stream) {
  const int64_t q_tiles = (max_window_tokens(p.geo) + kTileRows - 1) / kTileRows;
  const int64_t blocks = p.batch * num_windows(p.geo) * p.heads * q_tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  constexpr int smem = forward_smem_bytes<Elem, D>();
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<Elem, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  forward_kernel<Elem, D><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_forward_dim(const ForwardParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32:
      return launch_forward_typed<Elem, 32>(p, stream);
    case 64:
      return launch_forward_typed<Elem, 64>(p, stream);
    case 96:
      return launch_forward_typed<Elem, 96>(p, stream);
    case 128:
      return launch_forward_typed<Elem, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool supported_head_dim(int d) { return d == 32 || d == 64 || d == 96 || d == 128; }

cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream) {
  if (p.dtype == DType::f16) return launch_forward_dim<__half>(p, stream);
  if (p.dtype == DType::bf16) return launch_forward_dim<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace walt::attn::cuda
