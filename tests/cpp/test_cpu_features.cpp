// AVX-512F implies AVX2 on every x86 CPU that ships it; the dispatch relies on that ordering.
// WALT_CPU_ISA caps the dispatch with one vocabulary for both ops.
#include "walt/cpu_features.h"

#include <cstdlib>
#include <stdexcept>

#include "check.h"

static walt::CpuIsa isa_with(const char* cap) {
  setenv("WALT_CPU_ISA", cap, 1);
  return walt::cpu_isa();
}

int main() {
  if (walt::cpu_has_avx512f()) WALT_CHECK(walt::cpu_has_avx2());

  walt::CpuIsa isa;
  WALT_CHECK(walt::parse_cpu_isa("baseline", &isa) && isa == walt::CpuIsa::baseline);
  WALT_CHECK(walt::parse_cpu_isa("avx2", &isa) && isa == walt::CpuIsa::avx2);
  WALT_CHECK(walt::parse_cpu_isa("avx512", &isa) && isa == walt::CpuIsa::avx512);
  WALT_CHECK(walt::parse_cpu_isa("avx512f", &isa) && isa == walt::CpuIsa::avx512);
  WALT_CHECK(!walt::parse_cpu_isa("sse9", &isa) && !walt::parse_cpu_isa("AVX2", &isa));

  unsetenv("WALT_CPU_ISA");
  const walt::CpuIsa supported = walt::cpu_isa();
  WALT_CHECK(supported == (walt::cpu_has_avx512f() ? walt::CpuIsa::avx512
                           : walt::cpu_has_avx2()  ? walt::CpuIsa::avx2
                                                   : walt::CpuIsa::baseline));
  WALT_CHECK(isa_with("") == supported);  // set but empty: no cap
  WALT_CHECK(isa_with("baseline") == walt::CpuIsa::baseline);
  WALT_CHECK(isa_with("avx512") == supported && isa_with("avx512f") == supported);  // a cap never widens
  WALT_CHECK(isa_with("avx2") == (supported == walt::CpuIsa::baseline ? walt::CpuIsa::baseline : walt::CpuIsa::avx2));
  bool refused = false;
  try {
    isa_with("sse9");
  } catch (const std::runtime_error& e) {
    refused = std::string(e.what()) == "WALT_CPU_ISA must be one of 'baseline', 'avx2' or 'avx512', got 'sse9'.";
  }
  WALT_CHECK(refused);
  unsetenv("WALT_CPU_ISA");
  std::printf("avx2=%d avx512f=%d\n", walt::cpu_has_avx2(), walt::cpu_has_avx512f());
  return 0;
}
