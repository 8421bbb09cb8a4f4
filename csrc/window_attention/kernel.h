// CPU entry points of the window-attention op; op.cpp checks the arguments and registers them.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace walt::attn {

// out (like q, contiguous) and lse (B, T, H, W, heads) in float32 (float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               at::IntArrayRef window, double scale,
                                               const std::optional<at::Tensor>& rel_pos_bias);

// dq, dk, dv (contiguous, like q) and dbias (like rel_pos_bias, or an empty tensor when not requested).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window, double scale, const std::optional<at::Tensor>& rel_pos_bias,
    bool bias_requires_grad);

}  // namespace walt::attn
