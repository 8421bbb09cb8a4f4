// walt._C: the Python module that carries the ops library. The ops themselves are registered
// with TORCH_LIBRARY_FRAGMENT(walt, ...) in each op's op.cpp; this file only exposes what is not
// an op: how the library was built, what the running CPU offers and the limits the ops check.
#include <torch/extension.h>

#include <string>

#include "walt/cpu_features.h"
#include "window_attention/checks.h"
#include "window_attention/isa.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
  info["with_cuda"] = bool(WALT_WITH_CUDA);
#if defined(__AVX512F__)
  info["compiled_isa"] = "avx512f";
#elif defined(__AVX2__)
  info["compiled_isa"] = "avx2";
#else
  info["compiled_isa"] = "baseline";
#endif
  info["openmp"] = true;
  info["compiler"] = __VERSION__;
  return info;
}

pybind11::dict cpu_features() {
  pybind11::dict f;
  f["avx2"] = walt::cpu_has_avx2();
  f["avx512f"] = walt::cpu_has_avx512f();
  return f;
}

// The float32 attention kernel's row loops and GEMM on this CPU, as WALT_CPU_ISA leaves them.
std::string attention_cpu_path() {
  const walt::attn::RowOps& ops = walt::attn::row_ops();
  return std::string(ops.isa) + (ops.gemm ? " loops, walt GEMM" : " loops, BLAS GEMM");
}

// The limits the ops' checks apply, for the Python side to quote (walt/ops/window_attention.py).
pybind11::dict limits() {
  pybind11::dict tokens;
  tokens["cpu"] = walt::attn::window_token_limit(c10::DeviceType::CPU);
  tokens["cuda"] = walt::attn::window_token_limit(c10::DeviceType::CUDA);
  pybind11::dict attention;
  attention["max_window_entry"] = walt::attn::kMaxWindowEntry;
  attention["max_window_tokens"] = tokens;
  pybind11::dict all;
  all["window_attention"] = attention;
  return all;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "walt fused kernels (ops are registered under torch.ops.walt)";
  m.def("build_info", &build_info, "How walt._C was built.");
  m.def("cpu_features", &cpu_features, "SIMD features of the running CPU that walt's kernels dispatch on.");
  m.def("limits", &limits, "The limits the ops' argument checks apply (window entries, tokens per window and device).");
  m.def("attention_cpu_path", &attention_cpu_path, "Which row loops and GEMM float32 CPU attention runs on here.");
}
