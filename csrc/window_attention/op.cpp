// Schemas of the window-attention ops and their CPU registration: the shared argument checks
// (checks.h), then the CPU kernels (cpu.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu.h"

namespace walt::attn {
namespace {

// Both forwards: the shared checks, the empty answer to inputs without elements, then the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_forward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, at::IntArrayRef window,
                                                               double scale,
                                                               const std::optional<at::Tensor>& rel_pos_bias,
                                                               bool keep_probs) {
  check_forward_args(q, k, v, window, scale, rel_pos_bias);
  if (q.numel() == 0) return empty_forward(q, window, keep_probs);
  return forward_cpu(q, k, v, window, scale, rel_pos_bias, keep_probs);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           at::IntArrayRef window, double scale,
                                           const std::optional<at::Tensor>& rel_pos_bias) {
  auto [out, lse, probs] = checked_forward(q, k, v, window, scale, rel_pos_bias, /*keep_probs=*/false);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_keep_probs(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, at::IntArrayRef window,
                                                                  double scale,
                                                                  const std::optional<at::Tensor>& rel_pos_bias) {
  return checked_forward(q, k, v, window, scale, rel_pos_bias, /*keep_probs=*/true);
}

// Both backwards, likewise; `probs` is undefined when the backward recomputes them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> checked_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& probs, at::IntArrayRef window, double scale,
    const std::optional<at::Tensor>& rel_pos_bias, bool bias_requires_grad) {
  check_backward_args(grad_out, q, k, v, out, lse, window, scale, rel_pos_bias);
  if (probs.defined()) check_kept_probs(probs, q, lse, window);
  if (q.numel() == 0) return empty_backward(q, rel_pos_bias, bias_requires_grad);
  return backward_cpu(grad_out, q, k, v, out, lse, probs, window, scale, rel_pos_bias, bias_requires_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window, double scale, const std::optional<at::Tensor>& rel_pos_bias,
    bool bias_requires_grad) {
  return checked_backward(grad_out, q, k, v, out, lse, at::Tensor(), window, scale, rel_pos_bias, bias_requires_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kept_probs(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& probs, at::IntArrayRef window, double scale,
    const std::optional<at::Tensor>& rel_pos_bias, bool bias_requires_grad) {
  return checked_backward(grad_out, q, k, v, out, lse, probs, window, scale, rel_pos_bias, bias_requires_grad);
}

}  // namespace
}  // namespace walt::attn

TORCH_LIBRARY_FRAGMENT(walt, m) {
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[3] window, float scale, Tensor? rel_pos_bias) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[3] window, float scale, Tensor? rel_pos_bias, bool bias_requires_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  // The CPU training pair: the forward also returns the softmax probabilities, so the backward
  // skips recomputing them (one of its five GEMMs) for n^2 floats per (window, head) of memory.
  m.def(
      "window_attention_keep_probs(Tensor q, Tensor k, Tensor v, int[3] window, float scale, Tensor? rel_pos_bias) "
      "-> (Tensor out, Tensor lse, Tensor probs)");
  m.def(
      "window_attention_backward_kept_probs(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor probs, int[3] window, float scale, Tensor? rel_pos_bias, bool bias_requires_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(walt, CPU, m) {
  m.impl("window_attention", &walt::attn::forward);
  m.impl("window_attention_backward", &walt::attn::backward);
  m.impl("window_attention_keep_probs", &walt::attn::forward_keep_probs);
  m.impl("window_attention_backward_kept_probs", &walt::attn::backward_kept_probs);
}
