// walt/philox.h on its own: Philox4x32-10 against Random123's known answers, the uniform mapping's
// ranges, and the float log/sincos approximations against libm in double over every input the
// Box-Muller transform can feed them (2^24 each).
#include "walt/philox.h"

#include "walt/cpu_features.h"
#include "walt/philox_simd.h"

#include <cmath>
#include <cstdint>
#include <cstdio>

#include "check.h"

namespace {

bool equal(walt::philox_u32x4 a, walt::philox_u32x4 b) { return a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w; }

void known_answers() {
  // Random123 1.14 kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output.
  struct Kat {
    walt::philox_u32x4 ctr;
    uint32_t k0, k1;
    walt::philox_u32x4 out;
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, 0u, 0u, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       0xffffffffu,
       0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       0xa4093822u,
       0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) WALT_CHECK(equal(walt::philox4x32_10(k.ctr, k.k0, k.k1), k.out));
}

void mulhi_matches_64bit_product() {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < 1000000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const uint32_t a = static_cast<uint32_t>(state >> 32), b = static_cast<uint32_t>(state);
    WALT_CHECK(walt::philox_detail::mulhi(a, b) == static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32));
  }
  const uint32_t edge[] = {0u, 1u, 0xFFFFu, 0x10000u, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFu};
  for (uint32_t a : edge)
    for (uint32_t b : edge)
      WALT_CHECK(walt::philox_detail::mulhi(a, b) == static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32));
}

void uniform_ranges() {
  const float ulp24 = 5.9604644775390625e-8f;  // 2^-24
  WALT_CHECK(walt::philox_uniform_open0(0u) == ulp24);
  WALT_CHECK(walt::philox_uniform_open0(0xFFu) == ulp24);  // the low 8 bits are dropped
  WALT_CHECK(walt::philox_uniform_open0(0xFFFFFFFFu) == 1.0f);
  WALT_CHECK(walt::philox_uniform_open1(0u) == 0.0f);
  WALT_CHECK(walt::philox_uniform_open1(0xFFFFFFFFu) == 1.0f - ulp24);
  WALT_CHECK(walt::philox_uniform_open1(0x80000000u) == 0.5f);
  // Every value is k 2^-24 exactly: top-24-bit values below 2^24 convert to float without rounding.
  for (uint32_t k = 0; k < (1u << 24); k += 4099) {
    WALT_CHECK(static_cast<double>(walt::philox_uniform_open1(k << 8)) == std::ldexp(static_cast<double>(k), -24));
    WALT_CHECK(static_cast<double>(walt::philox_uniform_open0(k << 8)) == std::ldexp(static_cast<double>(k + 1), -24));
  }
}

void log_accuracy() {
  // All 2^24 values u1 = k 2^-24 can take; error in units of 2^-24 * max(1, |log u|).
  double worst = 0;
  for (uint32_t k = 1; k <= (1u << 24); ++k) {
    const float u = static_cast<float>(k) * 5.9604644775390625e-8f;
    const double exact = std::log(static_cast<double>(u));
    const double scale = std::ldexp(1.0, -24) * std::fmax(1.0, std::fabs(exact));
    const double err = std::fabs(walt::log_approx(u) - exact) / scale;
    worst = std::fmax(worst, err);
  }
  std::printf("log_approx: worst error %.2f x 2^-24 relative\n", worst);
  WALT_CHECK(worst < 2.0);
  WALT_CHECK(walt::log_approx(1.0f) == 0.0f);
}

void sincos_accuracy() {
  double worst = 0;
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    const double angle = 2 * M_PI * std::ldexp(static_cast<double>(k), -24);
    const walt::sincos_result r = walt::sincos_2pi_u24(k);
    worst = std::fmax(worst, std::fmax(std::fabs(r.sin - std::sin(angle)), std::fabs(r.cos - std::cos(angle))));
  }
  std::printf("sincos_2pi_u24: worst absolute error %.3g\n", worst);
  WALT_CHECK(worst < 1.5e-7);  // under 1.3 ulps of 1
  const walt::sincos_result zero = walt::sincos_2pi_u24(0), quarter = walt::sincos_2pi_u24(1u << 22),
                            half = walt::sincos_2pi_u24(1u << 23);
  WALT_CHECK(zero.sin == 0.0f && zero.cos == 1.0f);
  WALT_CHECK(quarter.sin == 1.0f && quarter.cos == 0.0f);
  WALT_CHECK(half.sin == 0.0f && half.cos == -1.0f);
}

void normals() {
  // u1 = 1 (all top bits set) gives radius 0; u1 = 2^-24 the largest radius sqrt(48 log 2).
  const walt::normal_pair zero = walt::box_muller(0xFFFFFFFFu, 0u);
  WALT_CHECK(zero.a == 0.0f && zero.b == 0.0f && !std::signbit(zero.a));
  const walt::normal_pair big = walt::box_muller(0u, 0u);
  WALT_CHECK(std::fabs(big.a - std::sqrt(48 * std::log(2.0))) < 1e-6 && big.b == 0.0f);
  // The element accessor agrees with the block form, and blocks with the raw generator.
  const uint64_t seed = 0x0123456789ABCDEFull, key = 0xFEDCBA9876543210ull;
  for (uint64_t block = 0; block < 64; ++block) {
    const walt::normal4 n = walt::philox_normal4(seed, key, block);
    for (int k = 0; k < 4; ++k) {
      WALT_CHECK(walt::philox_normal(seed, key, 4 * block + k) == n.v[k]);
      WALT_CHECK(std::isfinite(n.v[k]) && std::fabs(n.v[k]) < 5.78f);
    }
    const walt::philox_u32x4 o = walt::philox4x32_10(
        {static_cast<uint32_t>(block), 0u, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)},
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const walt::normal_pair p = walt::box_muller(o.x, o.y), q = walt::box_muller(o.z, o.w);
    WALT_CHECK(p.a == n.v[0] && p.b == n.v[1] && q.a == n.v[2] && q.b == n.v[3]);
  }
  // The counter's high word is the block index's: block 2^32 differs from block 0.
  WALT_CHECK(walt::philox_normal4(seed, key, uint64_t(1) << 32).v[0] != walt::philox_normal4(seed, key, 0).v[0]);
}

#if defined(__x86_64__)
// The vector Philox (walt/philox_simd.h) against the scalar definition, word for word, on every
// width this CPU runs. Returns how many widths were checked.
int simd_matches_scalar() {
  struct Case {
    uint32_t lo0, hi, key_lo, key_hi, seed_lo, seed_hi;
  };
  const Case cases[] = {{0u, 0u, 0u, 0u, 0u, 0u},
                        {512u, 0u, 7u, 0u, 42u, 0u},
                        {0xFFFFFFF0u, 3u, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu},
                        {0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u, 0xA4093822u, 0x299F31D0u}};
  int widths = 0;
  const int widths_to_try[] = {8, 16};
  for (int lanes : widths_to_try) {
    if (lanes == 8 ? !walt::cpu_has_avx2() : !walt::cpu_has_avx512f()) continue;
    ++widths;
    for (const Case& c : cases) {
      uint32_t words[4][16] = {};
      uint32_t* const rows[4] = {words[0], words[1], words[2], words[3]};
      if (lanes == 8) {
        walt::philox4x32_10_x8(c.lo0, c.hi, c.key_lo, c.key_hi, c.seed_lo, c.seed_hi, rows);
      } else {
        walt::philox4x32_10_x16(c.lo0, c.hi, c.key_lo, c.key_hi, c.seed_lo, c.seed_hi, rows);
      }
      for (int j = 0; j < lanes; ++j) {
        const walt::philox_u32x4 o = walt::philox4x32_10(
            {c.lo0 + static_cast<uint32_t>(j), c.hi, c.key_lo, c.key_hi}, c.seed_lo, c.seed_hi);
        WALT_CHECK(equal(o, {words[0][j], words[1][j], words[2][j], words[3][j]}));
      }
    }
  }
  return widths;
}
#endif

}  // namespace

int main() {
  known_answers();
  mulhi_matches_64bit_product();
  uniform_ranges();
  log_accuracy();
  sincos_accuracy();
  normals();
#if defined(__x86_64__)
  std::printf("vector Philox checked at %d widths\n", simd_matches_scalar());
#endif
  std::printf("philox: ok\n");
  return 0;
}
