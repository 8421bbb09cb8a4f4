// CUDA registration of the window-attention ops: the checks every device shares (op.cpp), the
// layout requirements of the tensor-core kernels, then the torch-free launchers in cuda/.
// Compiled only when the extension is built with CUDA.
//
// float16 and bfloat16 run on the tensor-core kernels. float32 and float64 run on the composite
// of ATen ops in composite.cpp (gathers, cuBLAS batched GEMMs, logsumexp), for any head size.
// Not TF32 tensor cores: TF32 rounds GEMM operands to a 10-bit mantissa, which would miss the
// float32 accuracy rule the other paths meet (within 2x the error of float32 PyTorch attention
// against the float64 oracle) by about three orders of magnitude: rounding q, k, v to TF32 alone
// gives output errors of 4e-4 to 1e-3 at d = 64 and 17, against 6e-7 to 8e-7 for float32 SDPA.
// The composite does float32 (float64) arithmetic at cuBLAS speed; it follows torch's float32
// matmul precision setting like any torch.matmul, so it is full float32 unless the user opts into
// TF32 globally. Its cost is memory: it holds the logits of every (batch, head, window),
// O(B * heads * windows * n^2).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "composite.h"
#include "cuda/launch.h"

namespace walt::attn {
namespace {

// The kernels gather rows with 16-byte copies: every token stride and the base must be 16-byte
// aligned. Views of a fused qkv projection with a supported head size always are; anything else
// is copied once to a contiguous tensor.
at::Tensor rows_16b_aligned(const at::Tensor& x) {
  const int64_t elems = 16 / x.element_size();
  bool ok = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int i = 0; i < 5; ++i) ok = ok && (x.stride(i) % elems == 0 || x.size(i) == 1);
  return ok ? x : x.contiguous();
}

TokenStrides strides(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)}; }

// float16/bfloat16 take the tensor-core kernels; float32/float64 the composite (see the top).
bool on_tensor_cores(const at::Tensor& q) {
  return q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
}

// Everything but the output pointers, which the forward and the backward set differently.
cuda::ForwardParams forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& bias_f32, at::IntArrayRef window, double scale) {
  TORCH_INTERNAL_ASSERT(on_tensor_cores(q), "window_attention: ", q.scalar_type(),
                        " inputs belong to the composite path, not the tensor-core kernels.");
  TORCH_CHECK(cuda::supported_head_dim(static_cast<int>(q.size(5))),
              "window_attention on CUDA supports head sizes d of 32, 64, 96 or 128, got ", q.size(5), ".");
  cuda::ForwardParams p;
  p.dtype = q.scalar_type() == at::kHalf ? DType::f16 : DType::bf16;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.sq = strides(q);
  p.sk = strides(k);
  p.sv = strides(v);
  p.out = nullptr;
  p.lse = nullptr;
  p.bias = bias_f32 ? bias_f32->const_data_ptr<float>() : nullptr;
  p.geo = make_window_geometry(q.size(1), q.size(2), q.size(3), window[0], window[1], window[2]);
  p.batch = q.size(0);
  p.heads = q.size(4);
  p.head_dim = static_cast<int>(q.size(5));
  p.scale = static_cast<float>(scale);
  return p;
}

std::optional<at::Tensor> bias_as_f32(const std::optional<at::Tensor>& bias) {
  if (!bias) return std::nullopt;
  return bias->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, at::IntArrayRef window, double scale,
                                                const std::optional<at::Tensor>& rel_pos_bias) {
  check_forward_args(q_in, k_in, v_in, window, scale, rel_pos_bias);
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (q_in.numel() == 0) {
    auto [out, lse, probs] = empty_forward(q_in, window, /*keep_probs=*/false);
    return {out, lse};
  }
  if (!on_tensor_cores(q_in)) return forward_composite(q_in, k_in, v_in, window, scale, rel_pos_bias);
  const at::Tensor q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 5), q.options().dtype(at::kFloat));
  const auto bias = bias_as_f32(rel_pos_bias);
  cuda::ForwardParams p = forward_params(q, k, v, bias, window, scale);
  p.out = out.mutable_data_ptr();
  p.so = strides(out);
  p.lse = lse.mutable_data_ptr<float>();
  C10_CUDA_CHECK(cuda::launch_forward(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse_in, at::IntArrayRef window, double scale,
    const std::optional<at::Tensor>& rel_pos_bias, bool bias_requires_grad) {
  check_backward_args(grad_out_in, q_in, k_in, v_in, out, lse_in, window, scale, rel_pos_bias);
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (q_in.numel() == 0) return empty_backward(q_in, rel_pos_bias, bias_requires_grad);
  if (!on_tensor_cores(q_in)) {
    return backward_composite(grad_out_in, q_in, k_in, v_in, out, lse_in, window, scale, rel_pos_bias,
                              bias_requires_grad);
  }
  const at::Tensor q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  const at::Tensor grad_out = rows_16b_aligned(grad_out_in);
  at::Tensor lse = lse_in.contiguous();
  // delta = rowsum(dO * O): one pass over two tensors, cheaper here than inside every key tile.
  const at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::empty(q.sizes(), options), dv = at::empty(q.sizes(), options);
  const auto bias = bias_as_f32(rel_pos_bias);
  cuda::BackwardParams bp;
  bp.fwd = forward_params(q, k, v, bias, window, scale);
  bp.fwd.lse = lse.mutable_data_ptr<float>();  // read only: the kernel loads lse, never stores it
  bp.grad_out = grad_out.const_data_ptr();
  bp.sdo = strides(grad_out);
  bp.delta = delta.const_data_ptr<float>();
  bp.dq = dq.mutable_data_ptr();
  bp.dk = dk.mutable_data_ptr();
  bp.dv = dv.mutable_data_ptr();
  bp.sdq = strides(dq);
  bp.sdk = strides(dk);
  bp.sdv = strides(dv);
  const int64_t tasks = q.size(0) * num_windows(bp.fwd.geo) * q.size(4);
  at::Tensor dq_accum = at::empty({tasks * max_window_tokens(bp.fwd.geo) * q.size(5)}, q.options().dtype(at::kFloat));
  bp.dq_accum = dq_accum.mutable_data_ptr<float>();
  at::Tensor dbias_partial, dbias;
  bp.dbias_partial = nullptr;
  bp.dbias = nullptr;
  if (bias && bias_requires_grad) {
    const int64_t table = bias_table_size(bp.fwd.geo);
    dbias_partial = at::empty({tasks * 4 * table}, q.options().dtype(at::kFloat));
    dbias = at::empty(rel_pos_bias->sizes(), q.options().dtype(at::kFloat));
    bp.dbias_partial = dbias_partial.mutable_data_ptr<float>();
    bp.dbias = dbias.mutable_data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::launch_backward(bp, c10::cuda::getCurrentCUDAStream()));
  dbias = dbias.defined() ? dbias.to(rel_pos_bias->scalar_type()) : at::empty({0}, q.options());
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace walt::attn

TORCH_LIBRARY_IMPL(walt, CUDA, m) {
  m.impl("window_attention", &walt::attn::forward_cuda);
  m.impl("window_attention_backward", &walt::attn::backward_cuda);
}
