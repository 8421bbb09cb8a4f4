// Backward of fused 3D window attention on tensor cores (sm_80+), deterministic.
//
// One CTA of 4 warps owns one (batch, window, head): windows are small (at most a few hundred
// tokens), so a single CTA can produce every gradient of its window without atomics. Key tiles of
// 64 are the outer loop, each warp owning 16 keys and accumulating their dK, dV in registers; query
// tiles of 64 are the inner loop. Per (key tile, query tile), with P recomputed from the stored
// logsumexp and delta = rowsum(dO * O):
//   S^T = K Q^T,  P^T = exp(scale S^T + bias - lse),  dV += P^T dO,  dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta),  dK += dS^T Q,  dQ += dS K  (dS staged through shared memory).
// dQ accumulates in a float32 scratch row owned by one thread across key tiles and is written on
// the last one. The bias gradient is summed per warp into its own table (shared memory when it
// fits, else global scratch) one query row at a time: within a row every key maps to a different
// table entry, so each entry's sum has one fixed order. A second kernel adds the per-(task, warp)
// tables of each head in a fixed order. The result is bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tile.cuh"

namespace walt::attn::cuda {
namespace {

constexpr int kBiasSmemLimit = 48 * 1024;  // bytes of per-warp bias tables kept in shared memory

template <typename Elem, int D>
struct BackwardSmem {
  static constexpr int LD = D + kPad;
  static constexpr int LDS = kTileRows + kPad;  // dS staged as Elem [query][key]
  static constexpr int LDF = kTileRows + 1;     // dS in float32 [query][key] for the bias gradient
  static constexpr int tiles_bytes = 4 * kTileRows * LD * int(sizeof(Elem));
  static constexpr int ds_bytes = kTileRows * LDS * int(sizeof(Elem));
  static constexpr int dsf_bytes = kTileRows * LDF * int(sizeof(float));
  static constexpr int vec_bytes = 4 * kTileRows * int(sizeof(float));  // lse, delta, query pos, key pos
  static constexpr int fixed_bytes = tiles_bytes + ds_bytes + dsf_bytes + vec_bytes;
};

bool bias_tables_in_smem(int64_t table_size) { return table_size * kWarps * int64_t(sizeof(float)) <= kBiasSmemLimit; }

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardParams bp, bool tables_in_smem) {
  using L = BackwardSmem<Elem, D>;
  constexpr int LD = L::LD, LDS = L::LDS, LDF = L::LDF;
  constexpr int kNT = kTileRows / 8;
  constexpr int kDT = D / 8;
  const ForwardParams& p = bp.fwd;
  extern __shared__ __align__(16) unsigned char smem[];
  Elem* sK = reinterpret_cast<Elem*>(smem);
  Elem* sV = sK + kTileRows * LD;
  Elem* sQ = sV + kTileRows * LD;
  Elem* sdO = sQ + kTileRows * LD;
  Elem* sdS = sdO + kTileRows * LD;
  float* sdSf = reinterpret_cast<float*>(sdS + kTileRows * LDS);
  float* sLse = sdSf + kTileRows * LDF;  // log2 domain
  float* sDelta = sLse + kTileRows;
  int* sQPos = reinterpret_cast<int*>(sDelta + kTileRows);
  int* sKPos = sQPos + kTileRows;
  float* sTables = reinterpret_cast<float*>(sKPos + kTileRows);

  const WindowGeometry& geo = p.geo;
  const int64_t windows = num_windows(geo);
  const int64_t task_id = blockIdx.x;
  const WindowTask task = decode_task(task_id, p.heads, windows);
  const WindowExtent e = window_extent(geo, task.win);
  const int n = static_cast<int>(e.n);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const float scale_log2 = p.scale * kLog2e;

  const Elem* q = static_cast<const Elem*>(p.q);
  const Elem* k = static_cast<const Elem*>(p.k);
  const Elem* v = static_cast<const Elem*>(p.v);
  const Elem* dout = static_cast<const Elem*>(bp.grad_out);
  Elem* dq = static_cast<Elem*>(bp.dq);
  Elem* dk = static_cast<Elem*>(bp.dk);
  Elem* dv = static_cast<Elem*>(bp.dv);
  float* dq_acc = bp.dq_accum + task_id * max_window_tokens(geo) * D;

  const int64_t table_size = bias_table_size(geo);
  const float* bias = p.bias != nullptr ? p.bias + task.head * table_size : nullptr;
  const bool want_dbias = bias != nullptr && bp.dbias != nullptr;
  const int center = static_cast<int>(bias_center(geo));
  float* tables = nullptr;  // kWarps tables of table_size floats
  if (want_dbias) {
    tables = tables_in_smem ? sTables : bp.dbias_partial + task_id * kWarps * table_size;
    for (int64_t i = threadIdx.x; i < kWarps * table_size; i += kThreads) tables[i] = 0.f;
  }
  float* my_table = want_dbias ? tables + warp * table_size : nullptr;

  const int last_key_tile = (n - 1) / kTileRows * kTileRows;
  for (int n0 = 0; n0 < n; n0 += kTileRows) {
    __syncthreads();
    gather_rows<Elem, D>(sK, k, e, n0, p.sk, task.b, task.head);
    gather_rows<Elem, D>(sV, v, e, n0, p.sv, task.b, task.head);
    cute::cp_async_fence();
    for (int i = threadIdx.x; i < kTileRows; i += kThreads) sKPos[i] = n0 + i < n ? bias_pos(geo, e, n0 + i) : 0;

    float dk_acc[kDT][4], dv_acc[kDT][4];
#pragma unroll
    for (int j = 0; j < kDT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) dk_acc[j][r] = dv_acc[j][r] = 0.f;

    // This thread's two keys (rows g and g+8 of the warp's 16).
    const int key_a = n0 + warp * 16 + g, key_b = key_a + 8;

    for (int m0 = 0; m0 < n; m0 += kTileRows) {
      __syncthreads();  // previous Q, dO, dS tiles are consumed
      gather_rows<Elem, D>(sQ, q, e, m0, p.sq, task.b, task.head);
      gather_rows<Elem, D>(sdO, dout, e, m0, bp.sdo, task.b, task.head);
      cute::cp_async_fence();
      for (int i = threadIdx.x; i < kTileRows; i += kThreads) {
        const bool valid = m0 + i < n;
        const int64_t idx = valid ? token_index(geo, e, m0 + i, task.b) * p.heads + task.head : 0;
        sLse[i] = valid ? p.lse[idx] * kLog2e : 0.f;
        sDelta[i] = valid ? bp.delta[idx] : 0.f;
        sQPos[i] = valid ? bias_pos(geo, e, m0 + i) + center : 0;
      }
      cute::cp_async_wait<0>();
      __syncthreads();

      // S^T and dP^T for this warp's 16 keys x 64 queries.
      float st[kNT][4], dpt[kNT][4];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) st[j][r] = dpt[j][r] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kf[4], vf[4];
        load_a(kf, sK, LD, warp * 16, kk * 16, lane);
        load_a(vf, sV, LD, warp * 16, kk * 16, lane);
#pragma unroll
        for (int j = 0; j < kNT; j += 2) {
          uint32_t qb[4], ob[4];
          load_b_rows(qb, sQ, LD, j * 8, kk * 16, lane);
          load_b_rows(ob, sdO, LD, j * 8, kk * 16, lane);
          mma_16816<Elem>(st[j], kf, qb[0], qb[1]);
          mma_16816<Elem>(st[j + 1], kf, qb[2], qb[3]);
          mma_16816<Elem>(dpt[j], vf, ob[0], ob[1]);
          mma_16816<Elem>(dpt[j + 1], vf, ob[2], ob[3]);
        }
      }

      // P^T and dS^T in registers; both packed as A fragments (keys x queries) for dV and dK.
      uint32_t pf[kTileRows / 16][4], dsf[kTileRows / 16][4];
      const int kpos_a = sKPos[warp * 16 + g], kpos_b = sKPos[warp * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        float pr[4], ds[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = j * 8 + 2 * c + (r & 1);  // query within the tile
          const int key = r < 2 ? key_a : key_b;
          const bool valid = key < n && m0 + col < n;
          float logit = st[j][r] * scale_log2 - sLse[col];
          if (bias != nullptr && valid) logit += __ldg(bias + sQPos[col] - (r < 2 ? kpos_a : kpos_b)) * kLog2e;
          pr[r] = valid ? exp2f(logit) : 0.f;
          ds[r] = pr[r] * (dpt[j][r] - sDelta[col]);
          const int key_row = warp * 16 + g + (r < 2 ? 0 : 8);
          sdS[col * LDS + key_row] = convert<Elem>(ds[r]);
          sdSf[col * LDF + key_row] = ds[r];
        }
        pf[j / 2][(j % 2) * 2] = pack2<Elem>(pr[0], pr[1]);
        pf[j / 2][(j % 2) * 2 + 1] = pack2<Elem>(pr[2], pr[3]);
        dsf[j / 2][(j % 2) * 2] = pack2<Elem>(ds[0], ds[1]);
        dsf[j / 2][(j % 2) * 2 + 1] = pack2<Elem>(ds[2], ds[3]);
      }

      // dV += P^T dO and dK += dS^T Q (scaled at the store).
#pragma unroll
      for (int kk = 0; kk < kTileRows / 16; ++kk) {
#pragma unroll
        for (int j = 0; j < kDT; j += 2) {
          uint32_t ob[4], qb[4];
          load_b_cols(ob, sdO, LD, kk * 16, j * 8, lane);
          load_b_cols(qb, sQ, LD, kk * 16, j * 8, lane);
          mma_16816<Elem>(dv_acc[j], pf[kk], ob[0], ob[1]);
          mma_16816<Elem>(dv_acc[j + 1], pf[kk], ob[2], ob[3]);
          mma_16816<Elem>(dk_acc[j], dsf[kk], qb[0], qb[1]);
          mma_16816<Elem>(dk_acc[j + 1], dsf[kk], qb[2], qb[3]);
        }
      }
      __syncthreads();  // dS of all warps is staged

      // dQ (this warp's 16 queries x D) += dS K, into the float32 scratch rows this thread owns.
      float dq_tile[kDT][4];
#pragma unroll
      for (int j = 0; j < kDT; ++j) dq_tile[j][0] = dq_tile[j][1] = dq_tile[j][2] = dq_tile[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kTileRows / 16; ++kk) {
        uint32_t af[4];
        load_a(af, sdS, LDS, warp * 16, kk * 16, lane);
#pragma unroll
        for (int j = 0; j < kDT; j += 2) {
          uint32_t kb[4];
          load_b_cols(kb, sK, LD, kk * 16, j * 8, lane);
          mma_16816<Elem>(dq_tile[j], af, kb[0], kb[1]);
          mma_16816<Elem>(dq_tile[j + 1], af, kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + warp * 16 + g + 8 * r;
        if (row >= n) continue;
        float* acc = dq_acc + static_cast<int64_t>(row) * D;
        Elem* dst = dq + token_offset(e, row, bp.sdq, task.b) + task.head * bp.sdq.head;
#pragma unroll
        for (int j = 0; j < kDT; ++j) {
          const int col = j * 8 + 2 * c;
          float2 sum = make_float2(dq_tile[j][2 * r], dq_tile[j][2 * r + 1]);
          if (n0 > 0) {
            const float2 prev = *reinterpret_cast<const float2*>(acc + col);
            sum.x += prev.x;
            sum.y += prev.y;
          }
          if (n0 == last_key_tile) {
            *reinterpret_cast<uint32_t*>(dst + col) = pack2<Elem>(sum.x * p.scale, sum.y * p.scale);
          } else {
            *reinterpret_cast<float2*>(acc + col) = sum;
          }
        }
      }

      // Bias gradient: one query row at a time, each lane adding the keys lane and lane + 32.
      if (want_dbias) {
        for (int rr = 0; rr < 16; ++rr) {
          const int qi = warp * 16 + rr;
          if (m0 + qi >= n) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int ki = lane + 32 * h;
            if (n0 + ki < n) my_table[sQPos[qi] - sKPos[ki]] += sdSf[qi * LDF + ki];
          }
        }
      }
    }

    // Store this key tile's dK (scaled) and dV.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = r == 0 ? key_a : key_b;
      if (key >= n) continue;
      Elem* dk_dst = dk + token_offset(e, key, bp.sdk, task.b) + task.head * bp.sdk.head;
      Elem* dv_dst = dv + token_offset(e, key, bp.sdv, task.b) + task.head * bp.sdv.head;
#pragma unroll
      for (int j = 0; j < kDT; ++j) {
        const int col = j * 8 + 2 * c;
        *reinterpret_cast<uint32_t*>(dk_dst + col) =
            pack2<Elem>(dk_acc[j][2 * r] * p.scale, dk_acc[j][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv_dst + col) = pack2<Elem>(dv_acc[j][2 * r], dv_acc[j][2 * r + 1]);
      }
    }
  }

  if (want_dbias && tables_in_smem) {
    __syncthreads();
    float* out = bp.dbias_partial + task_id * kWarps * table_size;
    for (int64_t i = threadIdx.x; i < kWarps * table_size; i += kThreads) out[i] = tables[i];
  }
}

// dbias[head][i] = sum over (batch, window, warp) of the partial tables, in that fixed order.
__global__ void reduce_bias_kernel(const float* __restrict__ partial, float* __restrict__ dbias, int64_t tasks_per_head,
                                   int64_t heads, int64_t table_size) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= heads * table_size) return;
  const int64_t head = i / table_size, entry = i % table_size;
  float sum = 0.f;
  for (int64_t t = 0; t < tasks_per_head; ++t) {  // task = (batch * windows + window) * heads + head
    const float* tab = partial + ((t * heads + head) * kWarps) * table_size + entry;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += tab[w * table_size];
  }
  dbias[i] = sum;
}

template <typename Elem, int D>
cudaError_t launch_backward_typed(const BackwardParams& bp, cudaStream_t stream) {
  const ForwardParams& p = bp.fwd;
  const int64_t tasks = p.batch * num_windows(p.geo) * p.heads;
  if (tasks == 0) return cudaSuccess;
  if (tasks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t table_size = bias_table_size(p.geo);
  const bool want_dbias = p.bias != nullptr && bp.dbias != nullptr;
  const bool in_smem = want_dbias && bias_tables_in_smem(table_size);
  const int smem = BackwardSmem<Elem, D>::fixed_bytes + (in_smem ? int(kWarps * table_size * sizeof(float)) : 0);
  cudaError_t err = cudaFuncSetAttribute(backward_kernel<Elem, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  backward_kernel<Elem, D><<<static_cast<unsigned>(tasks), kThreads, smem, stream>>>(bp, in_smem);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (want_dbias) {
    const int64_t entries = p.heads * table_size;
    reduce_bias_kernel<<<static_cast<unsigned>((entries + 255) / 256), 256, 0, stream>>>(
        bp.dbias_partial, bp.dbias, tasks / p.heads, p.heads, table_size);
    err = cudaGetLastError();
  }
  return err;
}

template <typename Elem>
cudaError_t launch_backward_dim(const BackwardParams& bp, cudaStream_t stream) {
  switch (bp.fwd.head_dim) {
    case 32:
      return launch_backward_typed<Elem, 32>(bp, stream);
    case 64:
      return launch_backward_typed<Elem, 64>(bp, stream);
    case 96:
      return launch_backward_typed<Elem, 96>(bp, stream);
    case 128:
      return launch_backward_typed<Elem, 128>(bp, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_backward(const BackwardParams& bp, cudaStream_t stream) {
  if (bp.fwd.dtype == DType::f16) return launch_backward_dim<__half>(bp, stream);
  if (bp.fwd.dtype == DType::bf16) return launch_backward_dim<__nv_bfloat16>(bp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace walt::attn::cuda
