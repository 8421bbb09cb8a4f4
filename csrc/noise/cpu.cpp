// CPU kernel of walt::add_noise: Philox normals and x_t / target in one pass over x0.
//
// Work is split into (sample, chunk of kChunk elements) tasks for at::parallel_for. A task draws
// the chunk's normals into a cache-resident buffer (a scalar build, an AVX2+FMA and an AVX-512
// build, picked at run time), then combines them with x0. Every value depends only on (seed, key,
// element index), so results are bitwise equal for any thread count, chunking or ISA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu.h"
#include "walt/cpu_features.h"

// No FMA contraction in this file's kernels: x_t = a*x0 + s*eps must round both products like
// diffusers does (walt/noising.h), and the normals' float approximations already spell out every
// fma they want (walt/philox.h). GCC decides contraction in the function the arithmetic ends up
// inlined into, so everything down to the parallel loop that calls `combine` stays inside
// push/pop; the torch inline functions it calls (sizes, data pointers) do no floating point.
// Without this, a build with FMA in its baseline ISA (aarch64, WALT_NATIVE=1) loses bitwise
// parity with diffusers, which tests/test_noise.py checks.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

#include "walt/philox.h"
#include "walt/philox_simd.h"

namespace walt::noise {
namespace {

// Elements per task. A multiple of 64 whose number of Philox blocks (512) divides 2^32: a chunk
// never crosses a change of the block counter's high word, and whole 16-block vectors fit it.
constexpr int64_t kChunk = 2048;

constexpr int64_t kChunkBlocks = kChunk / 4;

// Box-Muller of n blocks whose Philox words are w[0][j] .. w[3][j], into out[0 .. 4n).
inline __attribute__((always_inline)) void box_muller_blocks(float* __restrict out, const uint32_t* __restrict w0,
                                                              const uint32_t* __restrict w1,
                                                              const uint32_t* __restrict w2,
                                                              const uint32_t* __restrict w3, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {  // int64 index: GCC does not vectorize stores at a wrapping uint32 one
    const normal_pair p = box_muller(w0[j], w1[j]), q = box_muller(w2[j], w3[j]);
    out[4 * j] = p.a;
    out[4 * j + 1] = p.b;
    out[4 * j + 2] = q.a;
    out[4 * j + 3] = q.b;
  }
}

// The normals of Philox blocks lo0 .. lo0+n-1 (counter high word `hi`, n <= kChunkBlocks) of the
// sample keyed `key`, into out[0 .. 4n). Three builds of the same arithmetic, bitwise equal.
using FillFn = void (*)(float*, uint64_t, uint64_t, uint32_t, uint32_t, int64_t);

__attribute__((noinline)) void fill_normals_baseline(float* out, uint64_t seed, uint64_t key, uint32_t hi,
                                                     uint32_t lo0, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const normal4 v = philox_normal4(seed, key, (uint64_t(hi) << 32) | (lo0 + static_cast<uint32_t>(j)));
    for (int k = 0; k < 4; ++k) out[4 * j + k] = v.v[k];
  }
}

#if defined(__x86_64__)
// Philox a vector of blocks at a time with vpmuludq (walt/philox_simd.h) into a structure of
// arrays, then Box-Muller vectorized by GCC over that.
__attribute__((noinline, target("avx2,fma"))) void fill_normals_avx2(float* out, uint64_t seed, uint64_t key,
                                                                     uint32_t hi, uint32_t lo0, int64_t n) {
  alignas(64) uint32_t words[4][kChunkBlocks];
  for (int64_t j = 0; j < n; j += 8) {
    uint32_t* const rows[4] = {words[0] + j, words[1] + j, words[2] + j, words[3] + j};
    philox4x32_10_x8(lo0 + static_cast<uint32_t>(j), hi, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32),
                     static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), rows);
  }
  box_muller_blocks(out, words[0], words[1], words[2], words[3], n);
}

// 512-bit vectors for the Box-Muller loop too: GCC's generic tuning would stay at 256 bits.
__attribute__((noinline, target("avx512f,avx2,fma,prefer-vector-width=512"))) void fill_normals_avx512(
    float* out, uint64_t seed, uint64_t key, uint32_t hi, uint32_t lo0, int64_t n) {
  alignas(64) uint32_t words[4][kChunkBlocks];
  for (int64_t j = 0; j < n; j += 16) {
    uint32_t* const rows[4] = {words[0] + j, words[1] + j, words[2] + j, words[3] + j};
    philox4x32_10_x16(lo0 + static_cast<uint32_t>(j), hi, static_cast<uint32_t>(key),
                      static_cast<uint32_t>(key >> 32), static_cast<uint32_t>(seed),
                      static_cast<uint32_t>(seed >> 32), rows);
  }
  box_muller_blocks(out, words[0], words[1], words[2], words[3], n);
}
#endif

// x_t and the target of n elements of one sample with coefficients (a, s); eps is either the
// generated float normals or the caller's noise in x0's dtype.
template <NoiseTarget target, typename scalar_t, typename acc_t, typename eps_t>
inline __attribute__((always_inline)) void combine_body(const scalar_t* __restrict x0, const eps_t* __restrict eps,
                                                         acc_t a, acc_t s, scalar_t* __restrict x_t,
                                                         scalar_t* __restrict tgt, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(x0[i]);
    const acc_t e = static_cast<acc_t>(eps[i]);
    x_t[i] = static_cast<scalar_t>(noisy_sample(a, s, x, e));
    tgt[i] = static_cast<scalar_t>(noise_target<target>(a, s, x, e));
  }
}

// The same loop built for each ISA level (0 baseline, 1 AVX2, 2 AVX-512): it is memory-bound for
// float32, but the float16/bfloat16 conversions are worth the wider vectors.
template <NoiseTarget target, typename scalar_t, typename acc_t, typename eps_t>
using CombineFn = void (*)(const scalar_t*, const eps_t*, acc_t, acc_t, scalar_t*, scalar_t*, int64_t);

template <NoiseTarget target, typename scalar_t, typename acc_t, typename eps_t>
__attribute__((noinline)) void combine_baseline(const scalar_t* x0, const eps_t* eps, acc_t a, acc_t s, scalar_t* x_t,
                                                scalar_t* tgt, int64_t n) {
  combine_body<target>(x0, eps, a, s, x_t, tgt, n);
}

#if defined(__x86_64__)
template <NoiseTarget target, typename scalar_t, typename acc_t, typename eps_t>
__attribute__((noinline, target("avx2,fma"))) void combine_avx2(const scalar_t* x0, const eps_t* eps, acc_t a, acc_t s,
                                                                scalar_t* x_t, scalar_t* tgt, int64_t n) {
  combine_body<target>(x0, eps, a, s, x_t, tgt, n);
}

template <NoiseTarget target, typename scalar_t, typename acc_t, typename eps_t>
__attribute__((noinline, target("avx512f,avx2,fma,prefer-vector-width=512"))) void combine_avx512(
    const scalar_t* x0, const eps_t* eps, acc_t a, acc_t s, scalar_t* x_t, scalar_t* tgt, int64_t n) {
  combine_body<target>(x0, eps, a, s, x_t, tgt, n);
}
#endif

template <NoiseTarget target, typename scalar_t, typename acc_t, typename eps_t>
CombineFn<target, scalar_t, acc_t, eps_t> select_combine(int level) {
#if defined(__x86_64__)
  if (level == 2) return combine_avx512<target, scalar_t, acc_t, eps_t>;
  if (level == 1) return combine_avx2<target, scalar_t, acc_t, eps_t>;
#endif
  (void)level;
  return combine_baseline<target, scalar_t, acc_t, eps_t>;
}

FillFn select_fill(int level) {
#if defined(__x86_64__)
  if (level == 2) return fill_normals_avx512;
  if (level == 1) return fill_normals_avx2;
#endif
  (void)level;
  return fill_normals_baseline;
}

template <NoiseTarget target, typename scalar_t>
void run(const AddNoiseArgs& args, int level, scalar_t* x_t, scalar_t* tgt) {
  using acc_t = at::opmath_type<scalar_t>;
  const FillFn fill = select_fill(level);
  const auto combine_noise = select_combine<target, scalar_t, acc_t, scalar_t>(level);
  const auto combine_normals = select_combine<target, scalar_t, acc_t, float>(level);
  const int64_t B = args.x0.size(0);
  const int64_t N = B == 0 ? 0 : args.x0.numel() / B;
  if (N == 0) return;
  const scalar_t* x0 = args.x0.const_data_ptr<scalar_t>();
  const scalar_t* noise = args.noise ? args.noise->const_data_ptr<scalar_t>() : nullptr;
  const int64_t* keys = args.keys ? args.keys->const_data_ptr<int64_t>() : nullptr;
  const acc_t* coef_a = args.a.const_data_ptr<acc_t>();
  const acc_t* coef_s = args.s.const_data_ptr<acc_t>();
  const uint64_t seed = args.seed;

  const int64_t chunks = (N + kChunk - 1) / kChunk;
  // Tasks of at least ~32k elements per thread: below that the threads cost more than they save.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(N, kChunk));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, i0 = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, N - i0);
      const acc_t a = coef_a[b], s = coef_s[b];
      const int64_t off = b * N + i0;
      if (noise) {
        combine_noise(x0 + off, noise + off, a, s, x_t + off, tgt + off, n);
      } else {
        const uint64_t key = keys ? static_cast<uint64_t>(keys[b]) : static_cast<uint64_t>(b);
        const uint64_t block0 = static_cast<uint64_t>(i0) / 4;
        fill(buf, seed, key, static_cast<uint32_t>(block0 >> 32), static_cast<uint32_t>(block0), (n + 3) / 4);
        combine_normals(x0 + off, buf, a, s, x_t + off, tgt + off, n);
      }
    }
  });
}

}  // namespace
}  // namespace walt::noise

#pragma GCC pop_options

namespace walt::noise {

void add_noise_cpu_kernel(const AddNoiseArgs& args, at::Tensor& x_t, at::Tensor& target) {
  const int level = static_cast<int>(cpu_isa());  // 0 baseline, 1 AVX2+FMA, 2 AVX-512
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.x0.scalar_type(), "walt::add_noise", [&] {
    scalar_t* xt = x_t.mutable_data_ptr<scalar_t>();
    scalar_t* tg = target.mutable_data_ptr<scalar_t>();
    switch (args.target) {
      case NoiseTarget::v:
        run<NoiseTarget::v, scalar_t>(args, level, xt, tg);
        break;
      case NoiseTarget::eps:
        run<NoiseTarget::eps, scalar_t>(args, level, xt, tg);
        break;
      case NoiseTarget::x0:
        run<NoiseTarget::x0, scalar_t>(args, level, xt, tg);
        break;
    }
  });
}

}  // namespace walt::noise
