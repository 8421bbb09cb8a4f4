// Fused 3D window attention on CPU, forward and backward.
//
// One task per (batch, window, head), tasks handed out dynamically to the threads of one
// parallel region. A task computes the whole n x n logit block of its window with one GEMM
// (n <= 320 tokens for WALT's windows, so it stays in L2), a whole-row softmax (no online
// rescaling needed) and a second GEMM for P V, and writes its output rows. No partitioned copies
// of q, k, v or out exist at tensor level: float32 on AVX-512 and AVX2 CPUs reads q (any strides,
// unit stride on d) and writes out in place through per-token row pointers, copying only the
// task's GEMM B operands (K transposed, V) into thread-local buffers (forward_in_place,
// backward_in_place); other dtypes and CPUs gather the window's rows into thread-local, 64-byte
// aligned float32 buffers (float64 for float64; bf16/fp16 converted on load) and scatter the
// results (forward_gathered, backward_gathered). Tasks never share output elements
// (windows do not overlap), there are no cross-thread reductions, and each task's arithmetic
// does not depend on which thread runs it, so results are bitwise identical across runs and
// thread counts. The bias gradient is summed from per-task partial tables in a fixed order.
//
// The backward recomputes P from q, k and the logsumexp (flash-attention style), unless the
// forward kept it (window_attention_keep_probs, chosen by walt/ops/window_attention.py when
// training on the CPU within a memory budget): then it reads P in place and skips one of its
// five GEMMs, the exp and K's transposition.
//
// Every product is written as row-major C = op(A) B. On AVX-512 and AVX2 CPUs float32 products
// run on the kernel's own GEMM (gemm_avx512.cpp, gemm_avx2.cpp); otherwise, and for float64, they
// go to the BLAS PyTorch links (MKL here) through its Fortran interface.
#include "cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "checks.h"
#include "isa.h"
#include "walt/window_geometry.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace walt::attn {
namespace {

// Row-major C (m x N) = op(A) B (K x N), op(A) = A (m x K) or, with trans_a, A^T for A stored
// K x m. In the BLAS's column-major terms that is C^T = B^T op(A)^T, each row-major buffer
// already being its own transpose there.
inline void mm(int64_t m, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool trans_a = false) {
  static const auto custom = row_ops().gemm;
  if (custom) return custom(trans_a, m, N, K, InRows{A, lda}, InRows{B, ldb}, OutRows{C, ldc}, 1.f);
  const int m_ = int(m), n_ = int(N), k_ = int(K), lda_ = int(lda), ldb_ = int(ldb), ldc_ = int(ldc);
  const float one = 1, zero = 0;
  sgemm_("N", trans_a ? "T" : "N", &n_, &m_, &k_, &one, B, &ldb_, A, &lda_, &zero, C, &ldc_);
}
inline void mm(int64_t m, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
               int64_t ldc, bool trans_a = false) {
  const int m_ = int(m), n_ = int(N), k_ = int(K), lda_ = int(lda), ldb_ = int(ldb), ldc_ = int(ldc);
  const double one = 1, zero = 0;
  dgemm_("N", trans_a ? "T" : "N", &n_, &m_, &k_, &one, B, &ldb_, A, &lda_, &zero, C, &ldc_);
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A thread's scratch: one 64-byte aligned block carved into equally sized, aligned slices, and
// room for row pointers of up to `rows` tokens (the in-place float32 path).
template <typename acc_t>
struct Scratch {
  std::unique_ptr<acc_t[], FreeDeleter> mem;
  int64_t slice;  // elements per slice, a multiple of 64 bytes
  std::vector<const float*> in_rows;  // 5 x rows
  std::vector<float*> out_rows;       // 3 x rows
  Scratch(int slices, int64_t elems, int64_t rows = 0) : in_rows(size_t(5 * rows)), out_rows(size_t(3 * rows)) {
    const int64_t per_line = 64 / int64_t(sizeof(acc_t));
    slice = (elems + per_line - 1) / per_line * per_line;
    void* p = std::aligned_alloc(64, size_t(slices * slice) * sizeof(acc_t));
    TORCH_CHECK(p != nullptr, "window_attention: could not allocate ", slices * slice * sizeof(acc_t),
                " bytes of scratch memory.");
    mem.reset(static_cast<acc_t*>(p));
  }
  acc_t* operator[](int i) const { return mem.get() + i * slice; }
};

// Strides (in elements) of a (B, T, H, W, heads, d) tensor.
inline TokenStrides strides(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
}

// Calls f(i, offset) for the window's tokens in local order; offset is the token's element
// offset for batch b and head `head` in a tensor with strides s.
template <typename F>
inline void for_tokens(const WindowExtent& e, const TokenStrides& s, int64_t b, int64_t head, F&& f) {
  int64_t i = 0;
  for (int64_t t = 0; t < e.et; ++t)
    for (int64_t h = 0; h < e.eh; ++h) {
      const int64_t base = token_offset(e, Coord3{t, h, 0}, s, b) + head * s.head;
      for (int64_t w = 0; w < e.ew; ++w) f(i++, base + w * s.w);
    }
}

// dst row i = src row i * mul, converted to acc_t (n x d, row-major). Multiplying by the softmax
// scale here keeps it out of the products.
template <typename scalar_t, typename acc_t>
inline void gather(acc_t* dst, const scalar_t* src, const WindowExtent& e, const TokenStrides& s, int64_t b,
                   int64_t head, int64_t d, acc_t mul = acc_t(1)) {
  for_tokens(e, s, b, head, [&](int64_t i, int64_t off) {
    const scalar_t* x = src + off;
    acc_t* y = dst + i * d;
    if (mul == acc_t(1)) {
      for (int64_t a = 0; a < d; ++a) y[a] = static_cast<acc_t>(x[a]);
    } else {
      for (int64_t a = 0; a < d; ++a) y[a] = static_cast<acc_t>(x[a]) * mul;
    }
  });
}

// Asks for the cache lines of rows [lo, hi) (each cols floats) ahead of use: the rows are
// scattered through the input tensor, so the hardware prefetcher cannot guess them, and a loop
// that touches them one line at a time waits for each round of misses in turn.
template <typename T>
inline void prefetch_rows(T* const* rows, int64_t lo, int64_t hi, int64_t cols) {
  for (int64_t i = lo; i < hi; ++i)
    for (int64_t a = 0; a < cols; a += 16) __builtin_prefetch(rows[i] + a, std::is_const_v<T> ? 0 : 1);
}

// The leading dimension of a transposed operand (cols x rows, a GEMM's B): rows rounded up to a
// whole line, plus one line. Without the extra line a window of 256 tokens gives rows 1 KiB apart,
// the 64 rows of a B panel land in a quarter of L1's sets and evict one another; the logits'
// product measured 3.5% faster with it.
inline int64_t transposed_ld(int64_t rows) { return (rows + 15) / 16 * 16 + 16; }

// dst (cols x ld, row-major) = scale times the transpose of the rows src[0..rows), each cols
// long; blocks of 16 rows as below, the next block's rows requested while this one is copied,
// along with the same rows of `next` if given (the rows read next). Only the kernel's own GEMM
// reads rows in place, so whole 16 x 16 blocks go through its ISA's register transpose.
inline void transpose_rows(float* dst, int64_t ld, const float* const* src, int64_t rows, int64_t cols,
                           const float* const* next, float scale = 1.f) {
  static const auto transpose16 = row_ops().transpose16;
  prefetch_rows(src, 0, std::min<int64_t>(16, rows), cols);
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int64_t i1 = std::min<int64_t>(i0 + 16, rows);
    prefetch_rows(src, i1, std::min<int64_t>(i1 + 16, rows), cols);
    if (next) prefetch_rows(next, i0, i1, cols);
    int64_t a0 = 0;
    if (i1 - i0 == 16)
      for (; a0 + 16 <= cols; a0 += 16) transpose16(src + i0, a0, dst + a0 * ld + i0, ld, scale);
    for (int64_t a = a0; a < cols; ++a)
      for (int64_t i = i0; i < i1; ++i) dst[a * ld + i] = src[i][a] * scale;
  }
}

// dst (rows x cols, row-major) = the rows src[0..rows), each requested 16 rows ahead.
inline void copy_rows(float* dst, const float* const* src, int64_t rows, int64_t cols) {
  prefetch_rows(src, 0, std::min<int64_t>(16, rows), cols);
  for (int64_t i = 0; i < rows; ++i) {
    if (i + 16 < rows) prefetch_rows(src, i + 16, i + 17, cols);
    std::memcpy(dst + i * cols, src[i], sizeof(float) * cols);
  }
}

// dst (cols x rows) = src (rows x cols)^T, both row-major, in blocks of 16 rows so that each
// output line is written whole while the 16 source rows sit in L1.
template <typename acc_t>
inline void transpose(acc_t* dst, const acc_t* src, int64_t rows, int64_t cols) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int64_t i1 = std::min<int64_t>(i0 + 16, rows);
    for (int64_t a = 0; a < cols; ++a)
      for (int64_t i = i0; i < i1; ++i) dst[a * rows + i] = src[i * cols + a];
  }
}

// dst row i = src row i * mul * (row_scale ? row_scale[i] : 1), converted to scalar_t.
template <typename scalar_t, typename acc_t>
inline void scatter(scalar_t* dst, const acc_t* src, const WindowExtent& e, const TokenStrides& s, int64_t b,
                    int64_t head, int64_t d, acc_t mul = acc_t(1), const acc_t* row_scale = nullptr) {
  for_tokens(e, s, b, head, [&](int64_t i, int64_t off) {
    scalar_t* y = dst + off;
    const acc_t* x = src + i * d;
    const acc_t r = row_scale ? row_scale[i] * mul : mul;
    if (r == acc_t(1)) {
      for (int64_t a = 0; a < d; ++a) y[a] = static_cast<scalar_t>(x[a]);
    } else {
      for (int64_t a = 0; a < d; ++a) y[a] = static_cast<scalar_t>(x[a] * r);
    }
  });
}

// The bias runs of a window's rows (isa.h) and where row i's first run starts in a head's
// reversed table: the original index of key (t, h, w) is bias_index(q, 0) - t step_t - h step_h - w,
// step_t and step_h being the table's strides of t and h.
inline BiasRuns bias_runs(const WindowGeometry& g, const WindowExtent& e) {
  return BiasRuns{e.et, e.eh, e.ew, bias_pos(g, Coord3{1, 0, 0}), bias_pos(g, Coord3{0, 1, 0})};
}
inline int64_t reversed_bias_start(const WindowGeometry& g, const WindowExtent& e, int64_t i) {
  return bias_table_size(g) - 1 - bias_index(g, local_coords(e, i), Coord3{0, 0, 0});
}

// The bias of a full window, dense: (heads, n_max, n_max), row i of head h the bias of query i's
// keys. Every full window has the same one, so the tasks add it with one vector pass per row
// instead of a run per key (t, h); partial windows use the runs. Built once per call when it
// takes at most kDenseBiasElems elements (32 MiB of float32), else empty.
constexpr int64_t kDenseBiasElems = int64_t(1) << 23;

// Row loops: float32 uses the run-time dispatched SIMD loops; float64 (gradcheck, oracle
// comparisons) plain loops with std::exp.
struct RowsF {
  const RowOps& ops = row_ops();
  float max(const float* x, int64_t n) const { return ops.max(x, n); }
  float exp_sum(float* x, int64_t n, float sub) const { return ops.exp_sum(x, n, sub); }
  void log_add(float* lse, const float* m, int64_t n) const { ops.log_add(lse, m, n); }
  void exp(float* x, int64_t n, float sub) const { ops.exp(x, n, sub); }
  void scale_copy(float* dst, const float* src, int64_t n, float s) const { ops.scale_copy(dst, src, n, s); }
  void softmax_grad_dp(float* dp, const float* p, int64_t n, float delta) const { ops.softmax_grad_dp(dp, p, n, delta); }
  void softmax_grad(float* p, const float* dp, int64_t n, float delta) const { ops.softmax_grad(p, dp, n, delta); }
  float dot(const float* a, const float* b, int64_t n) const { return ops.dot(a, b, n); }
  void add(float* x, const float* b, int64_t n) const { ops.add(x, b, n); }
  void bias_add(float* row, const float* rev, const BiasRuns& r) const { ops.bias_add(row, rev, r); }
  void bias_acc(float* rev, const float* row, const BiasRuns& r) const { ops.bias_acc(rev, row, r); }
};
template <typename acc_t>
using Rows = std::conditional_t<std::is_same_v<acc_t, double>, PlainRows<double>, RowsF>;

// Adds the bias to logit row i of a (window e, head) task: the dense block's row for a full window
// (dense: the (heads, n_max, n_max) blocks, or null), else the row's runs of the head's reversed
// table (rev: the reversed tables; null: no bias).
template <typename acc_t>
inline void add_row_bias(const Rows<acc_t>& rows, acc_t* row, int64_t i, const WindowGeometry& g,
                         const WindowExtent& e, const BiasRuns& runs, int64_t head, const acc_t* rev,
                         const acc_t* dense) {
  const int64_t nmax = max_window_tokens(g);
  if (dense && e.n == nmax) {
    rows.add(row, dense + (head * nmax + i) * nmax, nmax);
  } else if (rev) {
    rows.bias_add(row, rev + head * bias_table_size(g) + reversed_bias_start(g, e, i), runs);
  }
}

// Runs body(worker scratch, task) for every task in [0, ntasks); workers pull tasks from a
// shared counter so partial windows do not unbalance the threads. Which thread runs a task
// does not change its result. (Software prefetch of the next task's rows was tried and
// measured no faster.) The region always opens with every thread, even for fewer
// tasks: inside a parallel region the BLAS runs sequentially, so a GEMM's summation order
// never depends on the thread count (with one thread, torch keeps MKL at one thread too).
//
// Calls with little work (flops below kInlineFlops, tens of microseconds) run on the calling
// thread: waking a second thread costs more than it saves, and on a loaded machine a region's
// barrier can wait for a descheduled thread for a whole scheduler slice. Their GEMMs are far
// too small for the BLAS to thread, so the result is the same either way.
constexpr double kInlineFlops = 4e6;

template <typename MakeScratch, typename Body>
void run_tasks(int64_t ntasks, double flops, MakeScratch&& make_scratch, Body&& body) {
  if (ntasks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = flops < kInlineFlops ? 1 : at::get_num_threads();
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t task = next++; task < ntasks; task = next++) body(scratch, task);
  });
}

// The two algorithms of a task, forward and backward, each its own function:
//   *_in_place: float32 on the kernel's own GEMM (AVX-512 and AVX2 CPUs). q, k, v, out and the
//     gradients are read and written where they lie, through per-token row pointers; only the
//     GEMMs' B operands are copied into thread-local rows.
//   *_gathered: every other dtype and CPU. The window's rows are gathered into thread-local
//     buffers in the accumulation type, the products go through mm() (the BLAS, or the kernel's own
//     GEMM for bfloat16/float16 where it exists), and the results are scattered back.
// Both share the softmax (forward) and the softmax gradient (backward) below.
using GemmRows = decltype(RowOps::gemm);

// Runs every task of a call (c: a ForwardCall or BackwardCall of `batch` batch elements), each
// thread with `slices` scratch slices: in_place on the kernel's own GEMM for float32 where the CPU
// has it, else gathered. products: the call's n x n x d products, which size its work (run_tasks).
template <typename scalar_t, typename Call, typename InPlace, typename Gathered>
void run_call(const Call& c, int64_t batch, double products, int slices, InPlace&& in_place, Gathered&& gathered) {
  using acc_t = decltype(c.scale);
  const int64_t ntasks = batch * c.nwin * c.heads;
  const double flops = products * double(ntasks) * double(c.nmax * c.nmax * c.d);
  const int64_t slice = std::max(c.nmax * c.nmax, transposed_ld(c.nmax) * c.d);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (c.gemm) return run_tasks(ntasks, flops, [&] { return Scratch<float>(slices, slice, c.nmax); }, in_place);
  }
  run_tasks(ntasks, flops, [&] { return Scratch<acc_t>(slices, slice); }, gathered);
}

// What every task of a call, forward or backward, shares: the geometry, q, k and v, the strides of
// out and lse, the bias, the row loops and the GEMM.
template <typename scalar_t, typename acc_t>
struct Call {
  WindowGeometry g;
  int64_t heads, d, nwin, nmax, table;
  acc_t scale;
  TokenStrides sq, sk, sv, so, sl;
  const scalar_t *qp, *kp, *vp;
  const acc_t* bias;   // the reversed bias tables, or null
  const acc_t* dense;  // the dense bias of a full window, or null
  Rows<acc_t> rows;
  GemmRows gemm;  // the kernel's own GEMM, or null
};

template <typename scalar_t, typename acc_t>
Call<scalar_t, acc_t> make_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const WindowGeometry& g, double scale, const at::Tensor& bias,
                                const at::Tensor& dense_bias) {
  return {g,
          q.size(4),
          q.size(5),
          num_windows(g),
          max_window_tokens(g),
          bias_table_size(g),
          static_cast<acc_t>(scale),
          strides(q),
          strides(k),
          strides(v),
          strides(out),
          strides(lse.unsqueeze(-1)),
          q.const_data_ptr<scalar_t>(),
          k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
          dense_bias.defined() ? dense_bias.const_data_ptr<acc_t>() : nullptr,
          Rows<acc_t>{},
          row_ops().gemm};
}

// What every task of one forward call shares. With `kept` set, each task's probabilities are also
// written there (normalised, n x n at the start of the task's n_max^2 slice) for the backward; out
// and lse are the same either way.
template <typename scalar_t, typename acc_t>
struct ForwardCall : Call<scalar_t, acc_t> {
  scalar_t* op;
  acc_t* lp;
  acc_t* kept;  // where the probabilities are kept, or null
};

// A task's batch element, head and window (numbered as walt/window_geometry.h says).
struct TaskWindow {
  int64_t task, b, head, n;
  WindowExtent e;
  TaskWindow(const WindowGeometry& g, int64_t heads, int64_t nwin, int64_t task_) : task(task_) {
    const WindowTask w = decode_task(task, heads, nwin);
    b = w.b;
    head = w.head;
    e = window_extent(g, w.win);
    n = e.n;
  }
};

// One forward task: its window and its slices of the thread's scratch (6 slices).
template <typename acc_t>
struct ForwardTask : TaskWindow {
  acc_t *Q, *Kt, *V, *O, *S;
  acc_t *inv, *row_lse, *row_max;  // per row: 1 / sum of exp, logsumexp, max; a slice holds >= 3 nmax
  acc_t* P_kept;                  // the task's kept probabilities, or null

  template <typename scalar_t>
  ForwardTask(const ForwardCall<scalar_t, acc_t>& c, const Scratch<acc_t>& buf, int64_t task)
      : TaskWindow(c.g, c.heads, c.nwin, task),
        Q(buf[0]),
        Kt(buf[1]),
        V(buf[2]),
        O(buf[3]),
        S(buf[4]),
        inv(buf[5]),
        row_lse(buf[5] + c.nmax),
        row_max(buf[5] + 2 * c.nmax),
        P_kept(c.kept ? c.kept + task * c.nmax * c.nmax : nullptr) {
    if (P_kept) std::fill(P_kept + n * n, P_kept + c.nmax * c.nmax, acc_t(0));  // a partial window's unused tail
  }
};

// Bias and whole-row softmax of the logits in S, left unnormalised: the 1/sum goes onto the d
// outputs of a row instead of its n probabilities. per_row(i) runs before row i.
template <typename scalar_t, typename acc_t, typename PerRow>
void softmax(const ForwardCall<scalar_t, acc_t>& c, const ForwardTask<acc_t>& t, PerRow&& per_row) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const BiasRuns runs = bias_runs(c.g, t.e);
  for (int64_t i = 0; i < t.n; ++i) {
    per_row(i);
    acc_t* row = t.S + i * t.n;
    add_row_bias(c.rows, row, i, c.g, t.e, runs, t.head, c.bias, c.dense);
    const acc_t m = c.rows.max(row, t.n);
    const acc_t sum = c.rows.exp_sum(row, t.n, m == -inf ? acc_t(0) : m);  // all -inf: P = 0
    t.inv[i] = sum > 0 ? acc_t(1) / sum : acc_t(0);
    t.row_max[i] = m;
    t.row_lse[i] = sum;  // made the logsumexp below, all rows at once
    if (c.kept) c.rows.scale_copy(t.P_kept + i * t.n, row, t.n, t.inv[i]);  // normalised, for the backward
  }
  c.rows.log_add(t.row_lse, t.row_max, t.n);
}

template <typename scalar_t, typename acc_t>
void store_lse(const ForwardCall<scalar_t, acc_t>& c, const ForwardTask<acc_t>& t) {
  for_tokens(t.e, c.sl, t.b, t.head, [&](int64_t i, int64_t off) { c.lp[off] = t.row_lse[i]; });
}

// q is read and out written in place through row pointers. The B operands are copied into
// contiguous rows, which the GEMM streams whole-K (gemm_avx512.cpp): K transposed and times the
// scale, then V.
void forward_in_place(const ForwardCall<float, float>& c, Scratch<float>& buf, int64_t task) {
  const ForwardTask<float> t(c, buf, task);
  const int64_t n = t.n, d = c.d;
  const float **qr = buf.in_rows.data(), **kr = qr + c.nmax, **vr = kr + c.nmax;
  float** orow = buf.out_rows.data();
  for_tokens(t.e, c.sq, t.b, t.head, [&](int64_t i, int64_t off) { qr[i] = c.qp + off; });
  for_tokens(t.e, c.sk, t.b, t.head, [&](int64_t i, int64_t off) { kr[i] = c.kp + off; });
  for_tokens(t.e, c.sv, t.b, t.head, [&](int64_t i, int64_t off) { vr[i] = c.vp + off; });
  for_tokens(t.e, c.so, t.b, t.head, [&](int64_t i, int64_t off) { orow[i] = c.op + off; });
  const int64_t ldk = transposed_ld(n);
  transpose_rows(t.Kt, ldk, kr, n, d, qr, c.scale);
  c.gemm(false, n, n, d, InRows{nullptr, 0, qr}, InRows{t.Kt, ldk}, OutRows{t.S, n}, 1.f);
  // V's rows are copied during the softmax, each requested 8 rows ahead, so their misses overlap
  // the exp. (Asking for out's rows as well measured 1.5% slower: at strides of a few KiB they
  // share a few L2 sets with the q, k and v rows.)
  prefetch_rows(vr, 0, std::min<int64_t>(8, n), d);
  softmax(c, t, [&](int64_t i) {
    if (i + 8 < n) prefetch_rows(vr, i + 8, i + 9, d);
    std::memcpy(t.V + i * d, vr[i], sizeof(float) * d);
  });
  c.gemm(false, n, d, n, InRows{t.S, n}, InRows{t.V, d}, OutRows{nullptr, 0, orow, t.inv}, 1.f);
  store_lse(c, t);
}

template <typename scalar_t, typename acc_t>
void forward_gathered(const ForwardCall<scalar_t, acc_t>& c, Scratch<acc_t>& buf, int64_t task) {
  const ForwardTask<acc_t> t(c, buf, task);
  const int64_t n = t.n, d = c.d;
  gather(t.Q, c.qp, t.e, c.sq, t.b, t.head, d, c.scale);  // Q holds scale * q
  gather(t.O, c.kp, t.e, c.sk, t.b, t.head, d);           // K, row-major, in O's buffer until PV
  transpose(t.Kt, t.O, n, d);
  gather(t.V, c.vp, t.e, c.sv, t.b, t.head, d);
  mm(n, n, d, t.Q, d, t.Kt, n, t.S, n);  // S = (scale Q) K^T
  softmax(c, t, [](int64_t) {});
  mm(n, d, n, t.S, n, t.V, d, t.O, d);  // O = P V
  scatter(c.op, t.O, t.e, c.so, t.b, t.head, d, acc_t(1), t.inv);
  store_lse(c, t);
}

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const WindowGeometry& g, double scale,
                  const at::Tensor& bias, const at::Tensor& dense_bias, at::Tensor& out, at::Tensor& lse,
                  at::Tensor& probs) {
  const ForwardCall<scalar_t, acc_t> c{{make_call<scalar_t, acc_t>(q, k, v, out, lse, g, scale, bias, dense_bias)},
                                       out.mutable_data_ptr<scalar_t>(),
                                       lse.mutable_data_ptr<acc_t>(),
                                       probs.defined() ? probs.mutable_data_ptr<acc_t>() : nullptr};
  run_call<scalar_t>(
      c, q.size(0), /*products=*/4, /*slices=*/6, [&](auto& buf, int64_t task) { forward_in_place(c, buf, task); },
      [&](auto& buf, int64_t task) { forward_gathered(c, buf, task); });
}

// What every task of one backward call shares. P comes from `kept` (the forward's) when set: one
// GEMM and the exp fewer; else it is recomputed from q, k, the bias and lse.
template <typename scalar_t, typename acc_t>
struct BackwardCall : Call<scalar_t, acc_t> {
  TokenStrides sdo, sdq, sdk, sdv;
  const scalar_t *op, *dop;
  scalar_t *dqp, *dkp, *dvp;
  const acc_t* kept;  // the forward's probabilities, or null
  const acc_t* lp;    // lse, read only when P is recomputed (else null)
  acc_t* partial;     // one reversed bias-gradient table per task, or null
};

// One backward task: its window, its slices of the thread's scratch (11 slices) and its row
// statistics, loaded.
template <typename acc_t>
struct BackwardTask : TaskWindow {
  BiasRuns runs;
  acc_t *Q, *K, *Kt, *Vt, *dO, *P, *dP, *dQ, *dK, *dV;
  acc_t *stat, *delta;  // per row: lse (when P is recomputed), rowsum(dO o O); a slice holds >= 2 nmax
  // The probabilities: the forward's, read where they lie, or recomputed into P. dS then goes
  // into dP's buffer (kept P is read-only: a second backward may need it) or in place of P.
  const acc_t* Pr;
  acc_t* dS;

  template <typename scalar_t>
  BackwardTask(const BackwardCall<scalar_t, acc_t>& c, const Scratch<acc_t>& buf, int64_t task)
      : TaskWindow(c.g, c.heads, c.nwin, task),
        runs(bias_runs(c.g, e)),
        Q(buf[0]),
        K(buf[1]),
        Kt(buf[2]),
        Vt(buf[3]),
        dO(buf[4]),
        P(buf[5]),
        dP(buf[6]),
        dQ(buf[7]),
        dK(buf[8]),
        dV(buf[9]),
        stat(buf[10]),
        delta(buf[10] + c.nmax),
        Pr(c.kept ? c.kept + task * c.nmax * c.nmax : P),
        dS(c.kept ? dP : P) {
    if (c.lp) for_tokens(e, c.sl, b, head, [&](int64_t i, int64_t off) { stat[i] = c.lp[off]; });
  }
};

// P = exp(scale Q K^T + bias - lse), unless the forward kept it: logits() writes the logits into
// P, then the bias and the saved row statistics make them probabilities.
template <typename scalar_t, typename acc_t, typename Logits>
void probabilities(const BackwardCall<scalar_t, acc_t>& c, const BackwardTask<acc_t>& t, Logits&& logits) {
  if (c.kept) return;
  logits();
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t n = t.n;
  for (int64_t i = 0; i < n; ++i) {
    add_row_bias(c.rows, t.P + i * n, i, c.g, t.e, t.runs, t.head, c.bias, c.dense);
    if (t.stat[i] == -inf) {  // fully masked row: P = 0
      std::fill(t.P + i * n, t.P + (i + 1) * n, acc_t(0));
    } else {
      c.rows.exp(t.P + i * n, n, t.stat[i]);
    }
  }
}

// dS = P o (dP - delta) and this task's own partial bias table.
template <typename scalar_t, typename acc_t>
void softmax_grad(const BackwardCall<scalar_t, acc_t>& c, const BackwardTask<acc_t>& t) {
  const int64_t n = t.n;
  for (int64_t i = 0; i < n; ++i) {
    if (c.kept) {
      c.rows.softmax_grad_dp(t.dP + i * n, t.Pr + i * n, n, t.delta[i]);
    } else {
      c.rows.softmax_grad(t.P + i * n, t.dP + i * n, n, t.delta[i]);
    }
    if (c.partial) {
      c.rows.bias_acc(c.partial + t.task * c.table + reversed_bias_start(c.g, t.e, i), t.dS + i * n, t.runs);
    }
  }
}

// out is read and dq, dk, dv are written in place through row pointers. Every B operand is copied
// into contiguous rows, which the GEMM streams whole-K, so each output row is written once
// (gemm_avx512.cpp): K^T, V^T, and K, Q and dO as they are (those three 1-5% faster than read in
// place, k-blocked).
void backward_in_place(const BackwardCall<float, float>& c, Scratch<float>& buf, int64_t task) {
  const BackwardTask<float> t(c, buf, task);
  const int64_t n = t.n, d = c.d, nmax = c.nmax;
  const float **qr = buf.in_rows.data(), **kr = qr + nmax, **vr = kr + nmax, **dor = vr + nmax;
  const float** orow = dor + nmax;
  float **dqr = buf.out_rows.data(), **dkr = dqr + nmax, **dvr = dkr + nmax;
  for_tokens(t.e, c.sq, t.b, t.head, [&](int64_t i, int64_t off) { qr[i] = c.qp + off; });
  for_tokens(t.e, c.sk, t.b, t.head, [&](int64_t i, int64_t off) { kr[i] = c.kp + off; });
  for_tokens(t.e, c.sv, t.b, t.head, [&](int64_t i, int64_t off) { vr[i] = c.vp + off; });
  for_tokens(t.e, c.sdo, t.b, t.head, [&](int64_t i, int64_t off) { dor[i] = c.dop + off; });
  for_tokens(t.e, c.so, t.b, t.head, [&](int64_t i, int64_t off) { orow[i] = c.op + off; });
  for_tokens(t.e, c.sdq, t.b, t.head, [&](int64_t i, int64_t off) { dqr[i] = c.dqp + off; });
  for_tokens(t.e, c.sdk, t.b, t.head, [&](int64_t i, int64_t off) { dkr[i] = c.dkp + off; });
  for_tokens(t.e, c.sdv, t.b, t.head, [&](int64_t i, int64_t off) { dvr[i] = c.dvp + off; });
  // K^T (times the scale, as in the forward: the same logits to the bit) only for the logits
  const int64_t ldt = transposed_ld(n);
  if (!c.kept) transpose_rows(t.Kt, ldt, kr, n, d, qr, c.scale);
  copy_rows(t.K, kr, n, d);
  copy_rows(t.Q, qr, n, d);
  transpose_rows(t.Vt, ldt, vr, n, d, nullptr);
  prefetch_rows(dor, 0, std::min<int64_t>(8, n), d);
  prefetch_rows(orow, 0, std::min<int64_t>(8, n), d);
  for (int64_t i = 0; i < n; ++i) {
    if (i % 8 == 0) {
      prefetch_rows(dor, i + 8, std::min<int64_t>(i + 16, n), d);
      prefetch_rows(orow, i + 8, std::min<int64_t>(i + 16, n), d);
    }
    t.delta[i] = c.rows.dot(dor[i], orow[i], d);
    std::memcpy(t.dO + i * d, dor[i], sizeof(float) * d);
    // The kept probabilities come from memory: ask for row i now, so that P^T dO, which reads
    // them a few columns at a time across all rows, finds them in L2.
    if (c.kept)
      for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(t.Pr + i * n + j, 0, 2);
  }
  probabilities(c, t, [&] { c.gemm(false, n, n, d, InRows{t.Q, d}, InRows{t.Kt, ldt}, OutRows{t.P, n}, 1.f); });
  c.gemm(true, n, d, n, InRows{t.Pr, n}, InRows{t.dO, d}, OutRows{nullptr, 0, dvr}, 1.f);    // P^T dO
  c.gemm(false, n, n, d, InRows{t.dO, d}, InRows{t.Vt, ldt}, OutRows{t.dP, n}, 1.f);        // dO V^T
  softmax_grad(c, t);
  c.gemm(false, n, d, n, InRows{t.dS, n}, InRows{t.K, d}, OutRows{nullptr, 0, dqr}, c.scale);  // dS K
  c.gemm(true, n, d, n, InRows{t.dS, n}, InRows{t.Q, d}, OutRows{nullptr, 0, dkr}, c.scale);   // dS^T Q
}

template <typename scalar_t, typename acc_t>
void backward_gathered(const BackwardCall<scalar_t, acc_t>& c, Scratch<acc_t>& buf, int64_t task) {
  const BackwardTask<acc_t> t(c, buf, task);
  const int64_t n = t.n, d = c.d;
  gather(t.Q, c.qp, t.e, c.sq, t.b, t.head, d, c.scale);  // Q holds scale * q
  gather(t.K, c.kp, t.e, c.sk, t.b, t.head, d);
  if (!c.kept) transpose(t.Kt, t.K, n, d);
  gather(t.dQ, c.vp, t.e, c.sv, t.b, t.head, d);  // V, row-major, in dQ's buffer for a moment
  transpose(t.Vt, t.dQ, n, d);
  gather(t.dO, c.dop, t.e, c.sdo, t.b, t.head, d);
  // delta_i = <dO_i, O_i>, with O as the forward wrote it; dQ's buffer holds O meanwhile.
  gather(t.dQ, c.op, t.e, c.so, t.b, t.head, d);
  for (int64_t i = 0; i < n; ++i) t.delta[i] = c.rows.dot(t.dO + i * d, t.dQ + i * d, d);
  probabilities(c, t, [&] { mm(n, n, d, t.Q, d, t.Kt, n, t.P, n); });
  mm(n, d, n, t.Pr, n, t.dO, d, t.dV, d, true);  // dV = P^T dO
  mm(n, n, d, t.dO, d, t.Vt, n, t.dP, n);        // dP = dO V^T
  softmax_grad(c, t);
  mm(n, d, n, t.dS, n, t.K, d, t.dQ, d);        // dQ = dS K, times scale on the way out
  mm(n, d, n, t.dS, n, t.Q, d, t.dK, d, true);  // dK = dS^T (scale Q)
  scatter(c.dqp, t.dQ, t.e, c.sdq, t.b, t.head, d, c.scale);
  scatter(c.dkp, t.dK, t.e, c.sdk, t.b, t.head, d);
  scatter(c.dvp, t.dV, t.e, c.sdv, t.b, t.head, d);
}

template <typename scalar_t, typename acc_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& probs, const WindowGeometry& g,
                   double scale, const at::Tensor& bias, const at::Tensor& dense_bias, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& dbias_partial) {
  const acc_t* kept = probs.defined() ? probs.const_data_ptr<acc_t>() : nullptr;
  const BackwardCall<scalar_t, acc_t> c{{make_call<scalar_t, acc_t>(q, k, v, out, lse, g, scale, bias, dense_bias)},
                                        strides(dout),
                                        strides(dq),
                                        strides(dk),
                                        strides(dv),
                                        out.const_data_ptr<scalar_t>(),
                                        dout.const_data_ptr<scalar_t>(),
                                        dq.mutable_data_ptr<scalar_t>(),
                                        dk.mutable_data_ptr<scalar_t>(),
                                        dv.mutable_data_ptr<scalar_t>(),
                                        kept,
                                        kept ? nullptr : lse.const_data_ptr<acc_t>(),
                                        dbias_partial.defined() ? dbias_partial.mutable_data_ptr<acc_t>() : nullptr};
  run_call<scalar_t>(
      c, q.size(0), /*products=*/10, /*slices=*/11, [&](auto& buf, int64_t task) { backward_in_place(c, buf, task); },
      [&](auto& buf, int64_t task) { backward_gathered(c, buf, task); });
}

WindowGeometry geometry(const at::Tensor& q, at::IntArrayRef window) {
  return make_window_geometry(q.size(1), q.size(2), q.size(3), window[0], window[1], window[2]);
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The bias table in the accumulation type, each head's entries in reverse flat order (a few KiB;
// not a partitioned copy): then a row's bias runs are contiguous ascending slices (isa.h).
at::Tensor reversed_bias_table(const std::optional<at::Tensor>& bias, at::ScalarType acc) {
  return bias.has_value() ? bias->to(acc).flip({1, 2, 3}).contiguous() : at::Tensor();
}

// The dense bias of a full window (see kDenseBiasElems) from the reversed table, or an empty tensor.
at::Tensor dense_bias(const at::Tensor& reversed, const WindowGeometry& g) {
  const int64_t nmax = max_window_tokens(g), table = bias_table_size(g);
  if (!reversed.defined() || reversed.size(0) * nmax * nmax > kDenseBiasElems) return at::Tensor();
  at::Tensor dense = at::zeros({reversed.size(0), nmax, nmax}, reversed.options());
  const WindowExtent e = window_extent(g, 0);  // the first window is always full
  const BiasRuns runs = bias_runs(g, e);
  AT_DISPATCH_FLOATING_TYPES(reversed.scalar_type(), "walt::window_attention_dense_bias", [&] {
    const Rows<scalar_t> rows;
    const scalar_t* rev = reversed.const_data_ptr<scalar_t>();
    scalar_t* out = dense.mutable_data_ptr<scalar_t>();
    for (int64_t h = 0; h < reversed.size(0); ++h)
      for (int64_t i = 0; i < nmax; ++i)
        rows.bias_add(out + (h * nmax + i) * nmax, rev + h * table + reversed_bias_start(g, e, i), runs);
  });
  return dense;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, at::IntArrayRef window, double scale,
                                                           const std::optional<at::Tensor>& rel_pos_bias,
                                                           bool keep_probs) {
  const at::ScalarType acc = acc_type(q);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 5), q.options().dtype(acc));
  at::Tensor probs = at::empty(keep_probs ? probs_shape(q, window) : std::vector<int64_t>{0}, q.options().dtype(acc));
  const WindowGeometry g = geometry(q, window);
  const at::Tensor bias = reversed_bias_table(rel_pos_bias, acc);
  const at::Tensor dense = dense_bias(bias, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "walt::window_attention", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      forward_impl<double, double>(q, k, v, g, scale, bias, dense, out, lse, probs);
    } else {
      forward_impl<scalar_t, float>(q, k, v, g, scale, bias, dense, out, lse, probs);
    }
  });
  return {out, lse, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& probs, at::IntArrayRef window, double scale,
    const std::optional<at::Tensor>& rel_pos_bias, bool bias_requires_grad) {
  const at::ScalarType acc = acc_type(q);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  const bool want_dbias = bias_requires_grad && rel_pos_bias.has_value();
  const WindowGeometry g = geometry(q, window);
  const at::Tensor bias = reversed_bias_table(rel_pos_bias, acc);
  const at::Tensor dense = probs.defined() ? at::Tensor() : dense_bias(bias, g);  // only to recompute P
  const int64_t B = q.size(0), heads = q.size(4), nwin = num_windows(g), table = bias_table_size(g);
  // One partial table per task (reversed, like the forward's), reduced below in a fixed order: no
  // atomics, no dependence on which thread ran which task.
  at::Tensor partial = want_dbias ? at::zeros({B * nwin, heads, table}, q.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "walt::window_attention_backward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      backward_impl<double, double>(grad_out, q, k, v, out, lse, probs, g, scale, bias, dense, dq, dk, dv, partial);
    } else {
      backward_impl<scalar_t, float>(grad_out, q, k, v, out, lse, probs, g, scale, bias, dense, dq, dk, dv, partial);
    }
  });
  if (!want_dbias) return {dq, dk, dv, at::empty({0}, q.options())};
  // dbias[h, r] = sum over (batch, window) of the partials, always in the same order.
  at::Tensor dbias = at::empty({heads, table}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "walt::window_attention_dbias", [&] {
    const scalar_t* pp = partial.const_data_ptr<scalar_t>();
    scalar_t* dp = dbias.mutable_data_ptr<scalar_t>();
    const int64_t tasks = B * nwin, entries = heads * table;
    at::parallel_for(0, entries, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        scalar_t s = 0;
        for (int64_t t = 0; t < tasks; ++t) s += pp[t * entries + r];
        dp[r] = s;
      }
    });
  });
  // The partials were accumulated in the reversed order of the forward's table.
  return {dq, dk, dv, dbias.view(rel_pos_bias->sizes()).flip({1, 2, 3}).to(rel_pos_bias->scalar_type())};
}

}  // namespace walt::attn
