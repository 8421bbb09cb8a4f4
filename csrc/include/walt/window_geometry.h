// Index math of 3D windowed attention, shared by the CPU kernels and (later) the CUDA kernels.
//
// The (T, H, W) grid is tiled by non-overlapping windows of the requested size clamped to the
// grid, starting at multiples of the window size; windows at the far edge may be partial and
// then hold only their valid tokens. Inside a window, tokens are numbered t-major, w-minor
// over the window's valid extent. The relative position bias table is sized by the requested
// (unclamped) window so one table fits any input size.
//
// Torch-free C++17 with WALT_HOST_DEVICE functions: no std:: containers, no exceptions, so
// nvcc can compile it for device code. Element offsets are int64.
#pragma once

#include <cstdint>

#include "walt/macros.h"

namespace walt {

struct Coord3 {
  int64_t t, h, w;
};

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

// Local token index i in [0, e.n) -> window-local coordinates.
WALT_HOST_DEVICE Coord3 local_coords(const WindowExtent& e, int64_t i) {
  return Coord3{i / (e.eh * e.ew), (i / e.ew) % e.eh, i % e.ew};
}

// Window-local coordinates -> grid coordinates.
WALT_HOST_DEVICE Coord3 global_coords(const WindowExtent& e, Coord3 local) {
  return Coord3{e.start.t + local.t, e.start.h + local.h, e.start.w + local.w};
}

// Entries of one head's bias table: (2rt-1) * (2rh-1) * (2rw-1).
WALT_HOST_DEVICE int64_t bias_table_size(const WindowGeometry& g) {
  return (2 * g.rt - 1) * (2 * g.rh - 1) * (2 * g.rw - 1);
}

// Flat index into one head's bias table for query a and key b (window-local coordinates):
// [a.t - b.t + rt - 1, a.h - b.h + rh - 1, a.w - b.w + rw - 1], as in Swin. Along a run of keys
// with consecutive w the index decreases by one per key, which the kernels exploit.
WALT_HOST_DEVICE int64_t bias_index(const WindowGeometry& g, Coord3 a, Coord3 b) {
  const int64_t dt = a.t - b.t + g.rt - 1;
  const int64_t dh = a.h - b.h + g.rh - 1;
  const int64_t dw = a.w - b.w + g.rw - 1;
  return (dt * (2 * g.rh - 1) + dh) * (2 * g.rw - 1) + dw;
}

}  // namespace walt
