"""`python -m walt.info`: how walt was built and what this machine offers it."""
import json
import platform

import torch

import walt
from walt import _C


def info() -> dict:
    build = dict(_C.build_info())
    return {
        "walt": walt.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_runtime": torch.__version__,
        "torch_built_against": build.pop("torch_version"),
        "cuda_kernels_built": build.pop("with_cuda"),
        "cuda_available": torch.cuda.is_available(),
        "cpu_features": dict(_C.cpu_features()),
        "attention_cpu": _C.attention_cpu_path(),
        "threads": torch.get_num_threads(),
        **build,
        "ops": sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("walt::")),
    }


def main():
    for key, value in info().items():
        print(f"{key:>20}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


if __name__ == "__main__":
    main()
