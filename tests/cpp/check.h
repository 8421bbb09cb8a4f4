// Minimal assertion helpers for the torch-free C++ unit tests (run by ctest).
#pragma once
#include <cstdio>
#include <cstdlib>

#define WALT_CHECK(cond)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)
