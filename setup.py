"""Build of walt._C: the two fused ops (window attention, noise injection) as torch custom ops.

walt compiles against the torch already installed, so build without pip's build isolation:

    pip install --no-build-isolation .        (or -e ".[test]"; `make install`)

An isolated build (plain `pip install .`) would have no torch, or a second one downloaded into the
build environment; it stops at once with that command instead. torch is not a build requirement
in pyproject.toml for the same reason.

CPU sources (csrc/**/*.cpp) are always built. CUDA sources are added when torch was built with
CUDA, the toolkit (nvcc) is found, and either a GPU is visible or TORCH_CUDA_ARCH_LIST names the
architectures to build for: nvcc alone on a machine without a GPU builds for the CPU.
WALT_FORCE_CUDA=1 forces a CUDA build, WALT_FORCE_CUDA=0 a CPU build. The CUDA sources are the
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

ROOT = os.path.dirname(os.path.abspath(__file__))
INSTALL_COMMAND = "pip install --no-build-isolation ."


def want_cuda(torch_cuda_version, cuda_home, gpu_visible, environ):
    """Whether to compile the CUDA sources (see the module docstring)."""
    forced = environ.get("WALT_FORCE_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"walt: WALT_FORCE_CUDA must be 0 (CPU build) or 1 (CUDA build), got {forced!r}.")
        return forced == "1"
    if torch_cuda_version is None or cuda_home is None:
        return False
    return bool(environ.get("TORCH_CUDA_ARCH_LIST", "").strip()) or gpu_visible()


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "walt: torch is not importable here (pip's build isolation hides the installed one); install torch, "
            f"then build against it with: {INSTALL_COMMAND}"
        ) from None
    return torch


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def main():
    torch = _import_torch()
    from setuptools import find_packages, setup
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = want_cuda(torch.version.cuda, CUDA_HOME, torch.cuda.is_available, os.environ)
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

    if with_cuda:
        cuda = f"included ({len(cuda_sources)} files, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', '')})"
    elif torch.version.cuda is not None and CUDA_HOME is not None and "WALT_FORCE_CUDA" not in os.environ:
        cuda = "not included (no GPU visible; TORCH_CUDA_ARCH_LIST or WALT_FORCE_CUDA=1 builds them)"
    else:
        cuda = "not included"
    print(f"walt: building walt._C for {platform.machine()} against torch {torch.__version__}; CUDA sources {cuda}")

    setup(
        packages=find_packages(include=["walt", "walt.*", "probes", "probes.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":  # `python setup.py ...` and pip's setuptools backend both run it as __main__
    main()
