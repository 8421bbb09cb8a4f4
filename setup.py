"""Build of walt._C: the two fused ops (window attention, noise injection) as torch custom ops.

CPU sources (csrc/**/*.cpp) are always built. CUDA sources are added when torch was built with
CUDA and nvcc is found, or when WALT_FORCE_CUDA=1; WALT_FORCE_CUDA=0 leaves them out. They are the
torch-free kernels (csrc/**/*.cu, which `make cuda-compile` checks with nvcc alone) and the torch
glue that registers them for the CUDA dispatch key (csrc/**/*_cuda.cpp). A CUDA build needs the
CUTLASS/CuTe headers of the nvidia-cutlass wheel (pip install --no-deps nvidia-cutlass==4.2.0.0);
a CPU build does not.
WALT_NATIVE=1 adds -march=native (off by default: the wheel must run on any x86-64/aarch64;
the hot loops pick AVX2/AVX-512 at run time instead).
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    forced = os.environ.get("WALT_FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


with_cuda = _want_cuda()
cuda_glue = _sources("*_cuda.cpp")
cpp_sources = [s for s in _sources("*.cpp") if s not in cuda_glue]
cuda_sources = cuda_glue + _sources("*.cu") if with_cuda else []

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
if os.environ.get("WALT_NATIVE") == "1":
    cxx_flags.append("-march=native")
nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
defines = [("WALT_WITH_CUDA", "1" if with_cuda else "0")]

if with_cuda:
    try:  # the kernels are written with CUTLASS/CuTe; its headers ship in the nvidia-cutlass wheel
        import cutlass_library
    except ImportError:
        raise SystemExit(
            "walt: CUDA kernels need the CUTLASS/CuTe headers: pip install --no-deps nvidia-cutlass==4.2.0.0 "
            "(or build without CUDA: WALT_FORCE_CUDA=0)"
        ) from None
    cutlass_root = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    include_dirs += [os.path.join(cutlass_root, "include"), os.path.join(cutlass_root, "tools", "util", "include")]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ext = CUDAExtension(
        "walt._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=defines,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "walt._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=defines,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

print(
    f"walt: building walt._C for {platform.machine()} against torch {torch.__version__}; "
    f"CUDA sources {'included (' + str(len(cuda_sources)) + ' files, archs ' + os.environ.get('TORCH_CUDA_ARCH_LIST', '') + ')' if with_cuda else 'not included'}"
)

setup(
    packages=find_packages(include=["walt", "walt.*", "probes", "probes.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
