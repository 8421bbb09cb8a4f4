// Counter-based Gaussian noise: Philox4x32-10 plus a Box-Muller transform built from
// vectorizable float approximations of log, sin and cos. Torch-free, C++17, no std containers or
// exceptions, so the CPU kernel and the CUDA kernel share one definition of every noise value.
//
// The bit-exact recipe (walt.ops.reference.philox_normal_reference implements it independently):
//
//   Philox4x32-10 (Salmon et al., SC 2011): multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57, Weyl
//   key increments W0 = 0x9E3779B9, W1 = 0xBB67AE85. One round maps counter (c0, c1, c2, c3)
//   under key (k0, k1) to
//       (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0));
//   ten rounds, the key bumped by (W0, W1) between rounds (Random123's philox4x32_R order).
//
//   Element i (row-major flat index within one sample's logical shape) of the sample with
//   64-bit key K, under the 64-bit seed S:
//       block   j = i / 4
//       counter   = (lo32(j), hi32(j), lo32(K), hi32(K)),  key = (lo32(S), hi32(S))
//       (x0, x1, x2, x3) = Philox4x32-10(counter, key)
//   Box-Muller on the pairs (x0, x1) and (x2, x3), taking the top 24 bits of each word so the
//   uniforms are exact in float32:
//       u1 = ((x_a >> 8) + 1) * 2^-24  in (0, 1]   (never 0: the log stays finite)
//       u2 =  (x_b >> 8)      * 2^-24  in [0, 1)
//       r  = sqrt(-2 log u1),  n_a = r cos(2 pi u2),  n_b = r sin(2 pi u2)
//   element i takes normal number i % 4 of (n0, n1, n2, n3). |n| <= sqrt(48 log 2) ~ 5.77.
//
// log, sin and cos are the float approximations below (about 1 ulp; |error| of a normal is below
// 1e-6). Every product that feeds an addition is written as an explicit fma, so the result does
// not depend on whether the compiler contracts a*b+c: AVX2, AVX-512, scalar host code and CUDA
// produce the same bits. On CUDA the intrinsics pin round-to-nearest even under --use_fast_math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "walt/macros.h"
#include "walt/rounding.h"


namespace walt {

struct philox_u32x4 {
  uint32_t x, y, z, w;
};

namespace philox_detail {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// High word of the 64-bit product a*b. On the host it is assembled from 16-bit partial products
// so that every operation stays in 32-bit lanes: GCC then vectorizes a loop of Philox blocks with
// plain 32-bit multiplies, where it emulates the 64-bit form lane by lane (about 2x slower). The
// CPU kernel's AVX2/AVX-512 builds use walt/philox_simd.h instead, faster still.
WALT_ALWAYS_INLINE uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  const uint32_t al = a & 0xFFFFu, ah = a >> 16, bl = b & 0xFFFFu, bh = b >> 16;
  const uint32_t t = al * bl;
  const uint32_t u = ah * bl + (t >> 16);        // < 2^32: (2^16-1)^2 + 2^16
  const uint32_t w = al * bh + (u & 0xFFFFu);    // < 2^32 likewise
  return ah * bh + (u >> 16) + (w >> 16);
#endif
}

WALT_ALWAYS_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

WALT_ALWAYS_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

}  // namespace philox_detail

// One Philox4x32 round; exposed for the unit tests.
WALT_ALWAYS_INLINE philox_u32x4 philox4x32_round(philox_u32x4 c, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  const uint32_t hi0 = mulhi(kM0, c.x), lo0 = kM0 * c.x;
  const uint32_t hi1 = mulhi(kM1, c.z), lo1 = kM1 * c.z;
  return {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Philox4x32-10 of `counter` under the key (k0, k1).
WALT_ALWAYS_INLINE philox_u32x4 philox4x32_10(philox_u32x4 c, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
// Device code unrolls with nvcc's pragma, host g++ with its own; nvcc's host pass gets neither
// (its host compiler would warn about the device pragma).
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    c = philox4x32_round(c, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// u1 = ((x >> 8) + 1) * 2^-24 in (0, 1]: exact in float32 and never zero.
WALT_ALWAYS_INLINE float philox_uniform_open0(uint32_t x) {
  return static_cast<float>(static_cast<int32_t>((x >> 8) + 1u)) * 5.9604644775390625e-8f;
}

// u2 = (x >> 8) * 2^-24 in [0, 1).
WALT_ALWAYS_INLINE float philox_uniform_open1(uint32_t x) {
  return static_cast<float>(static_cast<int32_t>(x >> 8)) * 5.9604644775390625e-8f;
}

// Natural log of a positive normal float (Cephes logf's reduction and polynomial): u = m 2^e
// with m in [sqrt(1/2), sqrt(2)), log u = e log 2 + log1p(m - 1). Branch-free so it vectorizes.
WALT_ALWAYS_INLINE float log_approx(float u) {
  using namespace philox_detail;
  const uint32_t b = float_bits(u);
  int32_t e = static_cast<int32_t>(b >> 23) - 126;             // u = m * 2^e, m in [0.5, 1)
  const float m = bits_float((b & 0x007FFFFFu) | 0x3F000000u);
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  const float x = small ? (m + m) - 1.0f : m - 1.0f;            // exact (Sterbenz)
  const float z = rn::mul(x, x);
  float p = 7.0376836292e-2f;
  p = rn::fma(p, x, -1.1514610310e-1f);
  p = rn::fma(p, x, 1.1676998740e-1f);
  p = rn::fma(p, x, -1.2420140846e-1f);
  p = rn::fma(p, x, 1.4249322787e-1f);
  p = rn::fma(p, x, -1.6668057665e-1f);
  p = rn::fma(p, x, 2.0000714765e-1f);
  p = rn::fma(p, x, -2.4999993993e-1f);
  p = rn::fma(p, x, 3.3333331174e-1f);
  const float fe = static_cast<float>(e);
  float y = rn::mul(rn::mul(x, z), p);
  y = rn::fma(fe, -2.12194440e-4f, y);  // log 2 split in two: 0.693359375 - 2.12194440e-4
  y = rn::fma(z, -0.5f, y);
  return rn::fma(fe, 0.693359375f, x + y);
}

// (sin, cos) of 2 pi k / 2^24 for an integer k in [0, 2^24). The reduction is exact integer
// arithmetic: k = q 2^22 + r with quadrant q = round(k / 2^22) and |r| <= 2^21, so the
// polynomials (Cephes sinf/cosf) only see |angle| <= pi/4.
struct sincos_result {
  float sin, cos;
};

WALT_ALWAYS_INLINE sincos_result sincos_2pi_u24(uint32_t k) {
  using namespace philox_detail;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t q = (ki + (1 << 21)) >> 22;  // 0..4; 4 is a full turn, same as 0
  const int32_t r = ki - q * (1 << 22);      // [-2^21, 2^21]
  const float x = rn::mul(static_cast<float>(r), 3.7450702829239549e-7f);  // 2 pi / 2^24
  const float z = rn::mul(x, x);
  float ps = -1.9515295891e-4f;
  ps = rn::fma(ps, z, 8.3321608736e-3f);
  ps = rn::fma(ps, z, -1.6666654611e-1f);
  const float s = rn::fma(ps, rn::mul(z, x), x);
  float pc = 2.443315711809948e-5f;
  pc = rn::fma(pc, z, -1.388731625493765e-3f);
  pc = rn::fma(pc, z, 4.166664568298827e-2f);
  const float c = rn::fma(pc, rn::mul(z, z), rn::fma(z, -0.5f, 1.0f));
  // sin(q pi/2 + x), cos(q pi/2 + x) for q mod 4 = 0: (s, c), 1: (c, -s), 2: (-s, -c), 3: (-c, s)
  const bool swap = (q & 1) != 0;
  const float sv = swap ? c : s, cv = swap ? s : c;
  const float sin_sign = (q & 2) ? -1.0f : 1.0f;
  const float cos_sign = ((q + 1) & 2) ? -1.0f : 1.0f;
  return {rn::mul(sv, sin_sign), rn::mul(cv, cos_sign)};
}

// Box-Muller on two Philox words: (r cos(2 pi u2), r sin(2 pi u2)).
struct normal_pair {
  float a, b;
};

WALT_ALWAYS_INLINE normal_pair box_muller(uint32_t xa, uint32_t xb) {
  using namespace philox_detail;
  const float m2l = rn::mul(-2.0f, log_approx(philox_uniform_open0(xa)));
  const float r = rn::sqrt(m2l > 0.0f ? m2l : 0.0f);  // u1 = 1 gives log 0 = +0 -> -0: keep r = +0
  const sincos_result sc = sincos_2pi_u24(xb >> 8);
  return {rn::mul(r, sc.cos), rn::mul(r, sc.sin)};
}

// The four normals of Philox block `block` for the sample key `key` under `seed`: elements
// 4*block .. 4*block+3 of that sample.
struct normal4 {
  float v[4];
};

WALT_ALWAYS_INLINE normal4 philox_normal4(uint64_t seed, uint64_t key, uint64_t block) {
  const philox_u32x4 ctr{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(key),
                         static_cast<uint32_t>(key >> 32)};
  const philox_u32x4 o = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const normal_pair p = box_muller(o.x, o.y), q = box_muller(o.z, o.w);
  return {{p.a, p.b, q.a, q.b}};
}

// Element i of the stream: what philox_normal4(seed, key, i / 4).v[i % 4] gives.
WALT_ALWAYS_INLINE float philox_normal(uint64_t seed, uint64_t key, uint64_t i) {
  return philox_normal4(seed, key, i >> 2).v[i & 3];
}

}  // namespace walt
