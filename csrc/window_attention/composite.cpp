// Window attention as a composite of ATen ops: the float32/float64 path on CUDA (op_cuda.cpp),
// and a private op (walt::_window_attention_composite[_backward]) so it can be tested anywhere.
//
// Layout. Every window gets n = wt*wh*ww slots (the clamped window's full size), numbered by
// full-window local coordinates: slot = (t*wh + h)*ww + w. Slots of a partial window that fall
// outside the grid are padding: as keys they are masked to -inf, as queries they are ignored.
// Two host-built index tensors connect the flattened (T*H*W) token axis and the slots:
//   gather  (windows*n):  slot -> token (padding slots point at their window's first token),
//   inverse (T*H*W):      token -> its slot,
// so q, k, v enter the windowed layout (B, heads, windows, n, d) with one index_select each and
// results leave it with one index_select through `inverse`: no scatter, no atomics. Because slots
// use full-window coordinates, every window, partial or not, shares one (n, n) bias index.
//
// Arithmetic. S = scale * Q K^T + bias, lse = logsumexp(S), P = exp(S - lse), out = P V, all in
// float32 (float64 for float64 inputs; float16/bfloat16 are upcast, so the composite serves any
// dtype). The backward recomputes P from lse, with lse = +inf on padding query slots so their
// rows of P, and hence of dS, are exactly zero:
//   dV = P^T dO,  dS = P * (dO V^T - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q.
// The bias gradient sums dS over (batch, window) into (heads, n, n) and folds each axis pair
// (a, b) onto the relative offset a - b + w - 1 with dense ops (flip, pad, reshape, sum), so it
// is deterministic on every device (index_add would use atomics on CUDA).
//
// Memory is O(B * heads * windows * n^2) for the logits; that is the price of a fallback built
// from library calls rather than a fused kernel.
#include "composite.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "walt/window_geometry.h"

namespace walt::attn {
namespace {

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The window tiling of one input as index tensors on the input's device.
struct Slots {
  WindowGeometry g;
  int64_t B, heads, d, tokens, windows, n;
  at::Tensor gather;   // (windows * n) int64: slot -> token
  at::Tensor inverse;  // (tokens) int64: token -> slot
  at::Tensor padding;  // (windows, n) bool, true on slots outside the grid; undefined if there are none
  at::Tensor rel;      // (n * n) int64: (query slot, key slot) -> flat bias table entry; undefined without bias
};

Slots make_slots(const at::Tensor& q, at::IntArrayRef window, bool with_bias) {
  Slots s;
  s.g = make_window_geometry(q.size(1), q.size(2), q.size(3), window[0], window[1], window[2]);
  const WindowGeometry& g = s.g;
  s.B = q.size(0);
  s.heads = q.size(4);
  s.d = q.size(5);
  s.tokens = g.T * g.H * g.W;
  s.windows = num_windows(g);
  s.n = max_window_tokens(g);
  const auto host = at::TensorOptions().dtype(at::kLong);
  at::Tensor gather = at::empty({s.windows * s.n}, host);
  at::Tensor inverse = at::empty({s.tokens}, host);
  at::Tensor padding = at::zeros({s.windows, s.n}, host.dtype(at::kBool));
  int64_t* gp = gather.mutable_data_ptr<int64_t>();
  int64_t* ip = inverse.mutable_data_ptr<int64_t>();
  bool* pp = padding.mutable_data_ptr<bool>();
  bool any_padding = false;
  const WindowExtent full = window_extent(g, 0);  // the first window is always full: its slots are every window's
  for (int64_t win = 0; win < s.windows; ++win) {
    const WindowExtent e = window_extent(g, win);
    const int64_t first_token = token_index(g, e, Coord3{0, 0, 0}, 0);
    for (int64_t slot = 0; slot < s.n; ++slot) {
      const Coord3 local = local_coords(full, slot);
      const int64_t i = win * s.n + slot;
      if (local.t < e.et && local.h < e.eh && local.w < e.ew) {
        const int64_t token = token_index(g, e, local, 0);
        gp[i] = token;
        ip[token] = i;
      } else {
        gp[i] = first_token;
        pp[i] = true;
        any_padding = true;
      }
    }
  }
  const auto dev = q.device();
  s.gather = gather.to(dev);
  s.inverse = inverse.to(dev);
  if (any_padding) s.padding = padding.to(dev);
  if (with_bias) {
    at::Tensor rel = at::empty({s.n * s.n}, host);
    int64_t* rp = rel.mutable_data_ptr<int64_t>();
    for (int64_t a = 0; a < s.n; ++a) {
      for (int64_t b = 0; b < s.n; ++b) rp[a * s.n + b] = bias_index(g, local_coords(full, a), local_coords(full, b));
    }
    s.rel = rel.to(dev);
  }
  return s;
}

// (B, T, H, W, heads, c) -> (B, heads, windows, n, c) in the compute type: one gather (a copy
// only where the grid axes of a strided view cannot be merged).
at::Tensor to_windows(const at::Tensor& x, const Slots& s, at::ScalarType compute) {
  const int64_t c = x.size(5);
  at::Tensor tokens = x.reshape({s.B, s.tokens, s.heads, c}).transpose(1, 2);  // (B, heads, tokens, c)
  return tokens.index_select(2, s.gather).view({s.B, s.heads, s.windows, s.n, c}).to(compute);
}

// (B, T, H, W, heads) -> (B, heads, windows, n).
at::Tensor rows_to_windows(const at::Tensor& x, const Slots& s, at::ScalarType compute) {
  at::Tensor tokens = x.reshape({s.B, s.tokens, s.heads}).transpose(1, 2);  // (B, heads, tokens)
  return tokens.index_select(2, s.gather).view({s.B, s.heads, s.windows, s.n}).to(compute);
}

// (B, heads, windows, n, d) -> contiguous (B, T, H, W, heads, d) in `dtype`.
at::Tensor from_windows(const at::Tensor& x, const Slots& s, at::ScalarType dtype) {
  at::Tensor slots = x.view({s.B, s.heads, s.windows * s.n, s.d}).transpose(1, 2);  // (B, slots, heads, d)
  return slots.index_select(1, s.inverse).view({s.B, s.g.T, s.g.H, s.g.W, s.heads, s.d}).to(dtype);
}

// (B, heads, windows, n) -> contiguous (B, T, H, W, heads).
at::Tensor rows_from_windows(const at::Tensor& x, const Slots& s) {
  at::Tensor slots = x.view({s.B, s.heads, s.windows * s.n}).transpose(1, 2);  // (B, slots, heads)
  return slots.index_select(1, s.inverse).view({s.B, s.g.T, s.g.H, s.g.W, s.heads});
}

// S = scale * Q K^T + bias, padding keys at -inf: (B, heads, windows, n, n).
at::Tensor logits(const at::Tensor& Q, const at::Tensor& K, const Slots& s, double scale,
                  const std::optional<at::Tensor>& bias) {
  at::Tensor S = at::matmul(Q, K.transpose(-1, -2));
  S.mul_(scale);
  if (bias.has_value()) {
    const at::Tensor table = bias->to(S.scalar_type()).reshape({s.heads, -1});
    S.add_(table.index_select(1, s.rel).view({s.heads, 1, s.n, s.n}));
  }
  if (s.padding.defined()) S.masked_fill_(s.padding.view({s.windows, 1, s.n}), -std::numeric_limits<double>::infinity());
  return S;
}

// x (..., m, m) -> (..., 2m - 1): out[..., o] = sum over a - b + m - 1 = o of x[..., a, b].
// Flipping b turns the offset into a + b'; padding rows to 2m and re-reading the flat data with
// rows of 2m - 1 shifts row a right by a, so column o of the result holds x[a, b] with
// a - b + m - 1 = o (or a zero), and a plain sum over a finishes the job.
at::Tensor fold_offsets(const at::Tensor& x) {
  const int64_t m = x.size(-1);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 2);
  std::vector<int64_t> flat = lead, rows = lead;
  flat.push_back(2 * m * m);
  rows.insert(rows.end(), {m, 2 * m - 1});
  const at::Tensor padded = at::constant_pad_nd(x.flip({-1}), {0, m});  // (..., m, 2m)
  return padded.reshape(flat).narrow(-1, 0, m * (2 * m - 1)).reshape(rows).sum(-2);
}

// dS summed over (batch, window), (heads, n, n) -> the gradient of the requested window's table.
at::Tensor bias_grad(const at::Tensor& dS_sum, const WindowGeometry& g) {
  const int64_t heads = dS_sum.size(0);
  at::Tensor x = dS_sum.view({heads, g.wt, g.wh, g.ww, g.wt, g.wh, g.ww});
  x = fold_offsets(x.permute({0, 2, 3, 5, 6, 1, 4}));  // (heads, ah, aw, bh, bw, ot)
  x = fold_offsets(x.permute({0, 2, 4, 5, 1, 3}));     // (heads, aw, bw, ot, oh)
  x = fold_offsets(x.permute({0, 3, 4, 1, 2}));        // (heads, ot, oh, ow)
  // The clamped window reaches offsets |a - b| < w; the table spans |a - b| < r, r >= w: the
  // offsets no window here can produce get zero gradient.
  const int64_t pt = g.rt - g.wt, ph = g.rh - g.wh, pw = g.rw - g.ww;
  return at::constant_pad_nd(x, {pw, pw, ph, ph, pt, pt});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     at::IntArrayRef window, double scale,
                                                     const std::optional<at::Tensor>& rel_pos_bias) {
  const at::ScalarType compute = compute_type(q);
  const Slots s = make_slots(q, window, rel_pos_bias.has_value());
  at::Tensor S = logits(to_windows(q, s, compute), to_windows(k, s, compute), s, scale, rel_pos_bias);
  at::Tensor lse = at::logsumexp(S, -1);
  const at::Tensor P = S.sub_(lse.unsqueeze(-1)).exp_();
  const at::Tensor O = at::matmul(P, to_windows(v, s, compute));
  return {from_windows(O, s, q.scalar_type()), rows_from_windows(lse, s)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_composite(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window, double scale, const std::optional<at::Tensor>& rel_pos_bias,
    bool bias_requires_grad) {
  const at::ScalarType compute = compute_type(q);
  const bool want_dbias = bias_requires_grad && rel_pos_bias.has_value();
  const Slots s = make_slots(q, window, rel_pos_bias.has_value());
  const at::Tensor Q = to_windows(q, s, compute), K = to_windows(k, s, compute), V = to_windows(v, s, compute);
  const at::Tensor dO = to_windows(grad_out, s, compute);
  at::Tensor L = rows_to_windows(lse, s, compute);
  // +inf on padding query slots: exp(S - L) makes their rows of P, and so of dS, exactly zero.
  if (s.padding.defined()) L.masked_fill_(s.padding.view({s.windows, s.n}), std::numeric_limits<double>::infinity());
  const at::Tensor delta = rows_to_windows((grad_out.to(compute) * out.to(compute)).sum(-1), s, compute);
  at::Tensor S = logits(Q, K, s, scale, rel_pos_bias);
  const at::Tensor P = S.sub_(L.unsqueeze(-1)).exp_();
  const at::Tensor dV = at::matmul(P.transpose(-1, -2), dO);
  at::Tensor dS = at::matmul(dO, V.transpose(-1, -2));  // dP
  dS.sub_(delta.unsqueeze(-1)).mul_(P);
  const at::Tensor dQ = at::matmul(dS, K).mul_(scale);
  const at::Tensor dK = at::matmul(dS.transpose(-1, -2), Q).mul_(scale);
  at::Tensor dbias = at::empty({0}, q.options());
  if (want_dbias) {
    dbias = bias_grad(dS.sum({0, 2}), s.g).to(rel_pos_bias->scalar_type());
  }
  const at::ScalarType dtype = q.scalar_type();
  return {from_windows(dQ, s, dtype), from_windows(dK, s, dtype), from_windows(dV, s, dtype), dbias};
}

namespace {

std::tuple<at::Tensor, at::Tensor> composite_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                at::IntArrayRef window, double scale,
                                                const std::optional<at::Tensor>& rel_pos_bias) {
  check_forward_args(q, k, v, window, scale, rel_pos_bias);
  if (q.numel() == 0) {
    auto [out, lse, probs] = empty_forward(q, window, /*keep_probs=*/false);
    return {out, lse};
  }
  return forward_composite(q, k, v, window, scale, rel_pos_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_backward_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window, double scale, const std::optional<at::Tensor>& rel_pos_bias,
    bool bias_requires_grad) {
  check_backward_args(grad_out, q, k, v, out, lse, window, scale, rel_pos_bias);
  if (q.numel() == 0) return empty_backward(q, rel_pos_bias, bias_requires_grad);
  return backward_composite(grad_out, q, k, v, out, lse, window, scale, rel_pos_bias, bias_requires_grad);
}

}  // namespace
}  // namespace walt::attn

// The composite as ops of its own, on every device: what tests compare against the oracle and the
// fused kernels. Not differentiable by itself; walt::window_attention's autograd pairs the two.
TORCH_LIBRARY_FRAGMENT(walt, m) {
  m.def(
      "_window_attention_composite(Tensor q, Tensor k, Tensor v, int[3] window, float scale, Tensor? rel_pos_bias) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "_window_attention_composite_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[3] window, float scale, Tensor? rel_pos_bias, bool bias_requires_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(walt, CompositeExplicitAutograd, m) {
  m.impl("_window_attention_composite", &walt::attn::composite_op);
  m.impl("_window_attention_composite_backward", &walt::attn::composite_backward_op);
}
