// Window attention as a composite of ATen ops (index_select, batched matmul, logsumexp, sums):
// device-agnostic, so the same code runs on the CPU (where tests check it) and on CUDA (cuBLAS),
// where it is the float32/float64 path. composite.cpp explains the layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace walt::attn {

// Same contract as the op (op.cpp): out is contiguous and shaped like q, lse is (B, T, H, W, heads)
// in float32 (float64 for float64 inputs). Arguments must already have passed check_forward_args,
// and q must have elements (empty inputs take empty_forward, checks.h).
std::tuple<at::Tensor, at::Tensor> forward_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     at::IntArrayRef window, double scale,
                                                     const std::optional<at::Tensor>& rel_pos_bias);

// dq, dk, dv (contiguous, like q) and dbias (like rel_pos_bias, or an empty tensor when not
// requested). Arguments must already have passed check_backward_args, and q must have elements
// (empty inputs take empty_backward, checks.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_composite(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window, double scale, const std::optional<at::Tensor>& rel_pos_bias,
    bool bias_requires_grad);

}  // namespace walt::attn
