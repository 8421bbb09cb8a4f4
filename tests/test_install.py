"""Installing walt: what `pip install .` does on a machine that has torch, when CUDA is built, and
what git ignores."""
import os
import re
import runpy
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def test_pyproject_never_asks_for_a_second_torch_to_build():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    requires = re.search(r"\[build-system\]\s*(?:#[^\n]*\n)*requires\s*=\s*\[([^\]]*)\]", text).group(1)
    assert "torch" not in requires, requires


def test_an_isolated_build_stops_at_once_with_the_right_command():
    """What `pip install .` runs first, in a build environment without torch."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - start < 30
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "walt: torch is not importable here (pip's build isolation hides the installed one); install torch, "
        "then build against it with: pip install --no-build-isolation ."
    ]


def _want_cuda(torch_cuda="12.8", cuda_home="/usr/local/cuda", gpu=False, **env):
    want = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="walt_setup")["want_cuda"]
    return want(torch_cuda, cuda_home, lambda: gpu, env)


def test_cuda_kernels_are_built_only_for_a_gpu_or_when_asked():
    assert not _want_cuda()  # CUDA torch and nvcc, but no GPU: a CPU build, no CUTLASS needed
    assert _want_cuda(gpu=True)
    assert _want_cuda(TORCH_CUDA_ARCH_LIST="9.0a")  # building for a GPU elsewhere
    assert not _want_cuda(torch_cuda=None, gpu=True)  # CPU torch
    assert not _want_cuda(cuda_home=None, gpu=True)  # no toolkit
    assert _want_cuda(torch_cuda=None, cuda_home=None, WALT_FORCE_CUDA="1")
    assert not _want_cuda(gpu=True, WALT_FORCE_CUDA="0")
    with pytest.raises(SystemExit, match="WALT_FORCE_CUDA must be 0 .* or 1 .*, got 'yes'"):
        _want_cuda(WALT_FORCE_CUDA="yes")


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git"))
                    and not os.path.isfile(os.path.join(ROOT, ".git")), reason="not a git checkout")
def test_generated_data_and_runs_are_ignored_but_the_data_package_is_not():
    res = subprocess.run(["git", "check-ignore", "--no-index", "data/world/train-00000.h5", "data/world/manifest.json",
                          "runs/ae/checkpoint.pt", "walt/data/new_reader.py"], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.split() == ["data/world/train-00000.h5", "data/world/manifest.json", "runs/ae/checkpoint.pt"]
