// Window geometry: every token belongs to exactly one window, edge windows have the right
// partial extents, local <-> global coordinates round-trip, token offsets and bias indices are
// the documented formulas in 64-bit and in the CUDA kernels' 32-bit form, and every task is
// decoded once.
#include "walt/window_geometry.h"

#include <vector>

#include "check.h"

using walt::Coord3;

static void check_grid(int64_t T, int64_t H, int64_t W, int64_t rt, int64_t rh, int64_t rw) {
  const walt::WindowGeometry g = walt::make_window_geometry(T, H, W, rt, rh, rw);
  WALT_CHECK(g.wt == (rt < T ? rt : T) && g.wh == (rh < H ? rh : H) && g.ww == (rw < W ? rw : W));
  WALT_CHECK(walt::num_windows(g) == ((T + g.wt - 1) / g.wt) * ((H + g.wh - 1) / g.wh) * ((W + g.ww - 1) / g.ww));

  std::vector<int> seen(static_cast<size_t>(T * H * W), 0);
  const int64_t table = walt::bias_table_size(g);
  WALT_CHECK(table == (2 * rt - 1) * (2 * rh - 1) * (2 * rw - 1));
  int64_t total = 0;
  for (int64_t win = 0; win < walt::num_windows(g); ++win) {
    const walt::WindowExtent e = walt::window_extent(g, win);
    // Windows start at multiples of the (clamped) window size.
    WALT_CHECK(e.start.t % g.wt == 0 && e.start.h % g.wh == 0 && e.start.w % g.ww == 0);
    // Full windows except at the far edge, where the extent is what is left of the grid.
    WALT_CHECK(e.et == (e.start.t + g.wt <= T ? g.wt : T - e.start.t));
    WALT_CHECK(e.eh == (e.start.h + g.wh <= H ? g.wh : H - e.start.h));
    WALT_CHECK(e.ew == (e.start.w + g.ww <= W ? g.ww : W - e.start.w));
    WALT_CHECK(e.et >= 1 && e.eh >= 1 && e.ew >= 1 && e.n == e.et * e.eh * e.ew);
    WALT_CHECK(e.n <= walt::max_window_tokens(g));
    total += e.n;
    for (int64_t i = 0; i < e.n; ++i) {
      const Coord3 l = walt::local_coords(e, i);
      WALT_CHECK(l.t >= 0 && l.t < e.et && l.h >= 0 && l.h < e.eh && l.w >= 0 && l.w < e.ew);
      WALT_CHECK((l.t * e.eh + l.h) * e.ew + l.w == i);  // t-major, w-minor numbering
      const Coord3 p = walt::global_coords(e, l);
      WALT_CHECK(p.t < T && p.h < H && p.w < W);
      // The 32-bit form the CUDA kernels use gives the same coordinates, offsets and bias positions.
      const walt::Coord3T<int> l32 = walt::local_coords(e, static_cast<int>(i));
      WALT_CHECK(l32.t == l.t && l32.h == l.h && l32.w == l.w);
      const walt::TokenStrides s{1000003, 7919, 613, 37, 5};
      const int64_t offset = 3 * s.b + p.t * s.t + p.h * s.h + p.w * s.w;
      WALT_CHECK(walt::token_offset(e, l, s, 3) == offset &&
                 walt::token_offset(e, static_cast<int>(i), s, 3) == offset);
      const int64_t index = ((2 * T + p.t) * H + p.h) * W + p.w;
      WALT_CHECK(walt::token_index(g, e, i, 2) == index && walt::token_index(g, e, static_cast<int>(i), 2) == index);
      WALT_CHECK(walt::bias_pos(g, e, static_cast<int>(i)) == walt::bias_pos(g, l));
      seen[static_cast<size_t>((p.t * H + p.h) * W + p.w)] += 1;
      for (int64_t j = 0; j < e.n; ++j) {
        const Coord3 m = walt::local_coords(e, j);
        const int64_t b = walt::bias_index(g, l, m);
        WALT_CHECK(b >= 0 && b < table);
        // The diagonal (same token) is the table's centre; consecutive w steps down by one.
        if (i == j) WALT_CHECK(b == ((rt - 1) * (2 * rh - 1) + rh - 1) * (2 * rw - 1) + rw - 1);
        WALT_CHECK(b == ((l.t - m.t + rt - 1) * (2 * rh - 1) + l.h - m.h + rh - 1) * (2 * rw - 1) + l.w - m.w + rw - 1);
        if (m.w + 1 < e.ew) WALT_CHECK(walt::bias_index(g, l, Coord3{m.t, m.h, m.w + 1}) == b - 1);
      }
    }
  }
  WALT_CHECK(total == T * H * W);
  for (int c : seen) WALT_CHECK(c == 1);  // every token in exactly one window
  WALT_CHECK(walt::bias_center(g) == walt::bias_pos(g, Coord3{rt - 1, rh - 1, rw - 1}));
  WALT_CHECK(walt::bias_pos(g, Coord3{1, 0, 0}) == (2 * rh - 1) * (2 * rw - 1));  // the table's strides
  WALT_CHECK(walt::bias_pos(g, Coord3{0, 1, 0}) == 2 * rw - 1);

  // Tasks: the head fastest, then the window, then the batch element; every task once.
  const int64_t batch = 2, heads = 3, windows = walt::num_windows(g);
  for (int64_t task = 0; task < batch * windows * heads; ++task) {
    const walt::WindowTask t = walt::decode_task(task, heads, windows);
    WALT_CHECK(t.b < batch && t.win < windows && t.head < heads);
    WALT_CHECK((t.b * windows + t.win) * heads + t.head == task);
  }
}

int main() {
  check_grid(5, 16, 16, 5, 8, 8);  // WALT's spatiotemporal window, divisible
  check_grid(5, 16, 16, 1, 16, 16);  // spatial window
  check_grid(7, 11, 13, 3, 5, 7);  // primes: partial windows on every axis
  check_grid(5, 16, 13, 5, 8, 8);  // partial on one axis
  check_grid(2, 3, 3, 5, 8, 8);  // grid smaller than the window: clamped, bias sized by request
  check_grid(3, 4, 5, 1, 1, 1);
  check_grid(1, 1, 1, 2, 2, 2);

  // Explicit edge extents: W = 13 with ww = 8 -> windows of 8 and 5.
  const walt::WindowGeometry g = walt::make_window_geometry(5, 16, 13, 5, 8, 8);
  WALT_CHECK(g.nt == 1 && g.nh == 2 && g.nw == 2);
  const walt::WindowExtent last = walt::window_extent(g, walt::num_windows(g) - 1);
  WALT_CHECK(last.start.t == 0 && last.start.h == 8 && last.start.w == 8);
  WALT_CHECK(last.et == 5 && last.eh == 8 && last.ew == 5 && last.n == 200);
  std::printf("window geometry ok\n");
  return 0;
}
