// Argument checks of the window-attention ops (checks.h), shared by every device's registration.
// Mistakes of value (shapes, devices, strides, ranges) raise c10::ValueError, of type (dtypes)
// c10::TypeError: Python sees ValueError and TypeError.
#include "checks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "walt/window_geometry.h"

namespace walt::attn {

int64_t window_token_limit(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? kMaxWindowTokensCuda : kMaxWindowTokensCpu;
}

namespace {

void check_like_q(const at::Tensor& q, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 6 && x.sizes() == q.sizes(), "window_attention: ", name, " must have q's shape ",
                    q.sizes(), ", got ", x.sizes(), ".");
  TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), "window_attention: ", name, " must have q's dtype ",
                   q.scalar_type(), ", got ", x.scalar_type(), ".");
  TORCH_CHECK_VALUE(x.device() == q.device(), "window_attention: ", name, " must be on q's device ", q.device(),
                    ", got ", x.device(), ".");
  // An empty tensor has no elements to read: any strides (e.g. the 0 of an expanded gradient) will do.
  TORCH_CHECK_VALUE(x.stride(5) == 1 || x.size(5) == 1 || x.numel() == 0, "window_attention: ", name,
                    " must have unit stride on its last dimension (d), got stride ", x.stride(5), ".");
}

}  // namespace

void check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef window,
                        double scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(q.dim() == 6, "window_attention: q must be a 6-D tensor (B, T, H, W, heads, d), got ", q.dim(),
                    " dimensions.");
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "window_attention: q must be float64, float32, bfloat16 or float16, got ", dt, ".");
  TORCH_CHECK_VALUE(q.size(5) >= 1,
                    "window_attention: the head size d (q's last dimension) must be at least 1, got 0.");
  check_like_q(q, q, "q");
  check_like_q(q, k, "k");
  check_like_q(q, v, "v");
  TORCH_CHECK_VALUE(window.size() == 3, "window_attention: window must have 3 entries (wt, wh, ww), got ",
                    window.size(), ".");
  TORCH_CHECK_VALUE(window[0] >= 1 && window[1] >= 1 && window[2] >= 1,
                    "window_attention: every window entry must be at least 1, got ", window, ".");
  TORCH_CHECK_VALUE(window[0] <= kMaxWindowEntry && window[1] <= kMaxWindowEntry && window[2] <= kMaxWindowEntry,
                    "window_attention: every window entry must be at most ", kMaxWindowEntry, " (2**31 - 1), got ",
                    window, ".");
  TORCH_CHECK_VALUE(std::isfinite(scale), "window_attention: scale must be a finite number, got ", scale, ".");
  const int64_t tokens =
      std::min(window[0], q.size(1)) * std::min(window[1], q.size(2)) * std::min(window[2], q.size(3));
  const int64_t limit = window_token_limit(q.device().type());
  TORCH_CHECK_VALUE(tokens <= limit, "window_attention: a window may hold at most ", limit, " tokens on ",
                    c10::DeviceTypeName(q.device().type()), ", got ", tokens, " (window ", window, " on a ",
                    q.sizes().slice(1, 3), " grid).");
  if (bias.has_value()) {
    const std::vector<int64_t> want{q.size(4), 2 * window[0] - 1, 2 * window[1] - 1, 2 * window[2] - 1};
    TORCH_CHECK_VALUE(bias->sizes() == at::IntArrayRef(want), "window_attention: rel_pos_bias must have shape ",
                      at::IntArrayRef(want), " (heads, 2*wt-1, 2*wh-1, 2*ww-1 for the requested window), got ",
                      bias->sizes(), ".");
    TORCH_CHECK_TYPE(bias->scalar_type() == dt || bias->scalar_type() == at::kFloat,
                     "window_attention: rel_pos_bias must have q's dtype or float32, got ", bias->scalar_type(), ".");
    TORCH_CHECK_VALUE(bias->device() == q.device(), "window_attention: rel_pos_bias must be on q's device ", q.device(),
                      ", got ", bias->device(), ".");
  }
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window, double scale,
                         const std::optional<at::Tensor>& rel_pos_bias) {
  check_forward_args(q, k, v, window, scale, rel_pos_bias);
  check_like_q(q, grad_out, "grad_out");
  check_like_q(q, out, "out");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 5), "window_attention: lse must have shape ",
                    q.sizes().slice(0, 5), " (B, T, H, W, heads), got ", lse.sizes(), ".");
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "window_attention: lse must be ", acc, " for ", q.scalar_type(),
                   " inputs, got ", lse.scalar_type(), ".");
  TORCH_CHECK_VALUE(lse.device() == q.device(), "window_attention: lse must be on q's device ", q.device(), ", got ",
                    lse.device(), ".");
}

void check_kept_probs(const at::Tensor& probs, const at::Tensor& q, const at::Tensor& lse, at::IntArrayRef window) {
  const std::vector<int64_t> want = probs_shape(q, window);
  TORCH_CHECK_VALUE(probs.sizes() == at::IntArrayRef(want) && probs.scalar_type() == lse.scalar_type() &&
                        probs.device() == q.device() && probs.is_contiguous(),
                    "window_attention: probs must be the contiguous ", lse.scalar_type(), " tensor of shape ",
                    at::IntArrayRef(want), " that window_attention_keep_probs returned for these inputs, got ",
                    probs.scalar_type(), " of shape ", probs.sizes(), ".");
}

std::vector<int64_t> probs_shape(const at::Tensor& q, at::IntArrayRef window) {
  if (q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0) return {q.size(0), 0, q.size(4), 0};  // no windows
  const WindowGeometry g = make_window_geometry(q.size(1), q.size(2), q.size(3), window[0], window[1], window[2]);
  const int64_t nmax = max_window_tokens(g);
  return {q.size(0), num_windows(g), q.size(4), nmax * nmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward(const at::Tensor& q, at::IntArrayRef window,
                                                             bool keep_probs) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {
      at::empty(q.sizes(), q.options()), at::empty(q.sizes().slice(0, 5), q.options().dtype(acc)),
      keep_probs ? at::empty(probs_shape(q, window), q.options().dtype(acc)) : at::empty({0}, q.options().dtype(acc))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_backward(const at::Tensor& q,
                                                                          const std::optional<at::Tensor>& rel_pos_bias,
                                                                          bool bias_requires_grad) {
  const bool want_dbias = bias_requires_grad && rel_pos_bias.has_value();
  return {at::empty(q.sizes(), q.options()), at::empty(q.sizes(), q.options()), at::empty(q.sizes(), q.options()),
          want_dbias ? at::zeros(rel_pos_bias->sizes(), rel_pos_bias->options()) : at::empty({0}, q.options())};
}

}  // namespace walt::attn
