// CPU entry points of the window-attention op; op.cpp checks the arguments and registers them.
// Both take inputs that passed the checks (checks.h) and have elements: op.cpp answers empty
// inputs with empty_forward / empty_backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace walt::attn {

// out (like q, contiguous), lse (B, T, H, W, heads) in float32 (float64 for float64 inputs) and,
// with keep_probs, the softmax probabilities (B, windows, heads, n_max^2) in lse's dtype: window
// task t's n x n block, row-major, at the start of its n_max^2 slice (else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, at::IntArrayRef window, double scale,
                                                           const std::optional<at::Tensor>& rel_pos_bias,
                                                           bool keep_probs);

// dq, dk, dv (contiguous, like q) and dbias (like rel_pos_bias, or an empty tensor when not
// requested). The probabilities come from `probs` (forward_cpu's) when defined, else they are
// recomputed from q, k and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& probs, at::IntArrayRef window, double scale,
    const std::optional<at::Tensor>& rel_pos_bias, bool bias_requires_grad);

}  // namespace walt::attn
