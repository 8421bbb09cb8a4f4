// Argument checks of the window-attention ops, shared by every device's registration: each user
// mistake ends in one sentence naming the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace walt::attn {

void check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef window,
                        double scale, const std::optional<at::Tensor>& rel_pos_bias);

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window, double scale,
                         const std::optional<at::Tensor>& rel_pos_bias);

}  // namespace walt::attn
