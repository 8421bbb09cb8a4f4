// Index math of 3D windowed attention, shared by the CPU kernels (window_attention/cpu.cpp), the
// composite of ATen ops (composite.cpp) and the CUDA kernels (window_attention/cuda/): the tiling
// of the grid into windows, the (batch, window, head) tasks, token offsets and bias positions.
//
// The (T, H, W) grid is tiled by non-overlapping windows of the requested size clamped to the
// grid, starting at multiples of the window size; windows at the far edge may be partial and
// then hold only their valid tokens. Inside a window, tokens are numbered t-major, w-minor
// over the window's valid extent. The relative position bias table is sized by the requested
// (unclamped) window so one table fits any input size.
//
// Torch-free C++17 with WALT_HOST_DEVICE functions: no std:: containers, no exceptions, so
// nvcc can compile it for device code. Element offsets are int64. Functions of a token's index
// within its window take any integer type: the CUDA kernels use int there (a window holds far
// fewer than 2^31 tokens, and 64-bit division is slow on the GPU), everything else int64_t.
#pragma once

#include <cstdint>

#include "walt/macros.h"

namespace walt {

template <typename Int>
struct Coord3T {
  Int t, h, w;
};
using Coord3 = Coord3T<int64_t>;

struct WindowGeometry {
  int64_t T, H, W;     // grid
  int64_t rt, rh, rw;  // requested window: sizes the bias table
  int64_t wt, wh, ww;  // window clamped to the grid: tiles it
  int64_t nt, nh, nw;  // windows per axis
};

// One window: where it starts in the grid and how many valid tokens it has per axis.
struct WindowExtent {
  Coord3 start;
  int64_t et, eh, ew;
  int64_t n;  // et * eh * ew
};

WALT_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
WALT_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Requires T, H, W >= 1 and a requested window >= 1 on every axis (the op checks both).
WALT_HOST_DEVICE WindowGeometry make_window_geometry(int64_t T, int64_t H, int64_t W, int64_t rt, int64_t rh,
                                                     int64_t rw) {
  WindowGeometry g;
  g.T = T;
  g.H = H;
  g.W = W;
  g.rt = rt;
  g.rh = rh;
  g.rw = rw;
  g.wt = min64(rt, T);
  g.wh = min64(rh, H);
  g.ww = min64(rw, W);
  g.nt = ceil_div(T, g.wt);
  g.nh = ceil_div(H, g.wh);
  g.nw = ceil_div(W, g.ww);
  return g;
}

WALT_HOST_DEVICE int64_t num_windows(const WindowGeometry& g) { return g.nt * g.nh * g.nw; }

// Tokens of a full (clamped) window: the largest n any window has.
WALT_HOST_DEVICE int64_t max_window_tokens(const WindowGeometry& g) { return g.wt * g.wh * g.ww; }

// Window `win` in [0, num_windows), numbered t-major over the window grid.
WALT_HOST_DEVICE WindowExtent window_extent(const WindowGeometry& g, int64_t win) {
  const int64_t iw = win % g.nw;
  const int64_t ih = (win / g.nw) % g.nh;
  const int64_t it = win / (g.nw * g.nh);
  WindowExtent e;
  e.start = Coord3{it * g.wt, ih * g.wh, iw * g.ww};
  e.et = min64(g.wt, g.T - e.start.t);
  e.eh = min64(g.wh, g.H - e.start.h);
  e.ew = min64(g.ww, g.W - e.start.w);
  e.n = e.et * e.eh * e.ew;
  return e;
}

// Local token index i in [0, e.n) -> window-local coordinates. (w, then h, then t: the order of
// the integer divisions the CUDA kernels were built with; another order schedules them differently.)
template <typename Int>
WALT_HOST_DEVICE Coord3T<Int> local_coords(const WindowExtent& e, Int i) {
  const Int ew = static_cast<Int>(e.ew), eh = static_cast<Int>(e.eh);
  Coord3T<Int> c;
  c.w = i % ew;
  c.h = (i / ew) % eh;
  c.t = i / (ew * eh);
  return c;
}

// Window-local coordinates -> grid coordinates.
WALT_HOST_DEVICE Coord3 global_coords(const WindowExtent& e, Coord3 local) {
  return Coord3{e.start.t + local.t, e.start.h + local.h, e.start.w + local.w};
}

// One unit of the kernels' work: the attention of one head within one window of one batch
// element. Tasks are numbered with the head fastest, then the window, then the batch element, so
// consecutive tasks read neighbouring bytes of the same tokens.
struct WindowTask {
  int64_t b, win, head;
};

WALT_HOST_DEVICE WindowTask decode_task(int64_t task, int64_t heads, int64_t windows) {
  WindowTask t;
  t.head = task % heads;
  task /= heads;
  t.win = task % windows;
  t.b = task / windows;
  return t;
}

// Element strides of a (B, T, H, W, heads, ...) tensor: batch, t, h, w, head.
struct TokenStrides {
  int64_t b, t, h, w, head;
};

// Element offset of the token at window-local coordinates c of window e in batch element b, head 0.
template <typename Int>
WALT_HOST_DEVICE int64_t token_offset(const WindowExtent& e, Coord3T<Int> c, const TokenStrides& s, int64_t b) {
  return b * s.b + (e.start.t + c.t) * s.t + (e.start.h + c.h) * s.h + (e.start.w + c.w) * s.w;
}

// The same for local token index i.
template <typename Int>
WALT_HOST_DEVICE int64_t token_offset(const WindowExtent& e, Int i, const TokenStrides& s, int64_t b) {
  return token_offset(e, local_coords(e, i), s, b);
}

// Flat (B, T, H, W) index of the token at window-local coordinates c of window e in batch element
// b: where arrays with one entry per token (the logsumexp, for one) keep it.
template <typename Int>
WALT_HOST_DEVICE int64_t token_index(const WindowGeometry& g, const WindowExtent& e, Coord3T<Int> c, int64_t b) {
  return ((b * g.T + e.start.t + c.t) * g.H + e.start.h + c.h) * g.W + e.start.w + c.w;
}

// The same for local token index i.
template <typename Int>
WALT_HOST_DEVICE int64_t token_index(const WindowGeometry& g, const WindowExtent& e, Int i, int64_t b) {
  return token_index(g, e, local_coords(e, i), b);
}

// Entries of one head's bias table: (2rt-1) * (2rh-1) * (2rw-1).
WALT_HOST_DEVICE int64_t bias_table_size(const WindowGeometry& g) {
  return (2 * g.rt - 1) * (2 * g.rh - 1) * (2 * g.rw - 1);
}

// The flat index into one head's bias table for query a and key b (window-local coordinates) is
// [a.t - b.t + rt - 1, a.h - b.h + rh - 1, a.w - b.w + rw - 1], as in Swin. It is affine in each
// coordinate, so it splits into a position per token: bias_center(g) + bias_pos(g, a) -
// bias_pos(g, b). bias_pos(g, {1, 0, 0}) and bias_pos(g, {0, 1, 0}) are the table's strides of t
// and h; along a run of keys with consecutive w the index decreases by one per key, which the
// kernels exploit.
template <typename Int>
WALT_HOST_DEVICE Int bias_pos(const WindowGeometry& g, Coord3T<Int> c) {
  return (c.t * static_cast<Int>(2 * g.rh - 1) + c.h) * static_cast<Int>(2 * g.rw - 1) + c.w;
}

// The same for local token i of window e.
template <typename Int>
WALT_HOST_DEVICE Int bias_pos(const WindowGeometry& g, const WindowExtent& e, Int i) {
  return bias_pos(g, local_coords(e, i));
}

// The index of a token's bias with itself: bias_pos(g, {rt - 1, rh - 1, rw - 1}), spelled out in
// the form the CUDA kernels were built with (the C++ test checks the two agree).
WALT_HOST_DEVICE int64_t bias_center(const WindowGeometry& g) {
  return ((g.rt - 1) * (2 * g.rh - 1) + (g.rh - 1)) * (2 * g.rw - 1) + (g.rw - 1);
}

WALT_HOST_DEVICE int64_t bias_index(const WindowGeometry& g, Coord3 a, Coord3 b) {
  return bias_center(g) + bias_pos(g, a) - bias_pos(g, b);
}

}  // namespace walt
