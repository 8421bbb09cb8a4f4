// AVX-512F implies AVX2 on every x86 CPU that ships it; the dispatch relies on that ordering.
#include "walt/cpu_features.h"

#include "check.h"

int main() {
  if (walt::cpu_has_avx512f()) WALT_CHECK(walt::cpu_has_avx2());
  std::printf("avx2=%d avx512f=%d\n", walt::cpu_has_avx2(), walt::cpu_has_avx512f());
  return 0;
}
