// Argument checks of the window-attention ops (checks.cpp), shared by every device's registration
// (op.cpp, op_cuda.cpp, composite.cpp): each user mistake ends in one sentence naming the argument
// and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace walt::attn {

// Window entries beyond the grid are clamped, so any size is meaningful; this bound keeps the bias
// table's 2w-1 and the token counts far from int64 overflow.
constexpr int64_t kMaxWindowEntry = 2147483647;

// The most tokens a window may hold after clamping, on each device. On the CPU the kernel holds a
// window's whole n x n logit block per thread (a dozen such buffers in the backward): beyond this
// it would need gigabytes, so the check says so instead of failing to allocate. On CUDA the
// backward kernel gives a whole window to one thread block, written for windows of a few hundred
// tokens, and the float32/float64 composite holds every window's n x n logits at once.
constexpr int64_t kMaxWindowTokensCpu = 2048;
constexpr int64_t kMaxWindowTokensCuda = 2048;
int64_t window_token_limit(c10::DeviceType device);

// Checks of the ops' arguments; each mistake raises c10::ValueError or c10::TypeError (Python's
// ValueError and TypeError) with one sentence. Python checks only what cannot reach here: the
// arguments' types and window entries beyond int64 (walt/ops/window_attention.py).
void check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef window,
                        double scale, const std::optional<at::Tensor>& rel_pos_bias);

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window, double scale,
                         const std::optional<at::Tensor>& rel_pos_bias);

// The probabilities handed back to window_attention_backward_kept_probs must be the ones
// window_attention_keep_probs returned for q, lse and window (checked after check_backward_args).
void check_kept_probs(const at::Tensor& probs, const at::Tensor& q, const at::Tensor& lse, at::IntArrayRef window);

// Shape of the probabilities window_attention_keep_probs keeps: (B, windows, heads, n*n); windows
// and n are 0 when T, H or W is 0.
std::vector<int64_t> probs_shape(const at::Tensor& q, at::IntArrayRef window);

// Inputs without elements (B, T, H, W or heads of 0) have empty results and, in the backward, empty
// gradients and a zero bias gradient. Every registration (CPU, CUDA, the composite) returns these
// instead of running its kernels, whose window tiling needs T, H, W >= 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward(const at::Tensor& q, at::IntArrayRef window,
                                                             bool keep_probs);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_backward(
    const at::Tensor& q, const std::optional<at::Tensor>& rel_pos_bias, bool bias_requires_grad);

}  // namespace walt::attn
