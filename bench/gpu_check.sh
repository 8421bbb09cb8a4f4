#!/usr/bin/env bash
# One command for a GPU machine: build walt with CUDA, run the CUDA tests and the GPU benchmarks,
# and keep everything under bench/results/<card>-<date>/ (commit that folder).
# Usage: bash bench/gpu_check.sh   (or `make gpu-check`)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-')
out="bench/results/${card:-gpu}-$(date +%Y-%m-%d)"
mkdir -p "$out"
{
  echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  $PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
} | tee "$out/environment.txt"

# The CUDA build needs the CUTLASS/CuTe headers. This machine is offline: take the nvidia-cutlass
# wheel from wheels/ (not in git; copy it there first), headers only, hence --no-deps.
if ! $PYTHON -c "import cutlass_library" 2> /dev/null; then
  wheel=$(ls wheels/nvidia_cutlass-4.2.0.0-*.whl 2> /dev/null | head -1)
  if [ -z "$wheel" ]; then
    echo "CUDA kernels need the CUTLASS/CuTe headers: copy nvidia_cutlass-4.2.0.0-py3-none-any.whl into wheels/" \
      "(pip download --no-deps nvidia-cutlass==4.2.0.0 -d wheels on a connected machine) and rerun" >&2
    exit 1
  fi
  $PYTHON -m pip install --no-deps --no-index "$wheel" || exit 1
fi

status=0
WALT_FORCE_CUDA=1 $PYTHON -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
$PYTHON -m walt.info | tee -a "$out/environment.txt"
$PYTHON -m pytest -q -m cuda -rs tests/test_cuda.py tests/test_probe_fit.py 2>&1 | tee "$out/tests.txt" || status=1

# WALT-L attention (heads 16, d 64) and a d = 128 variant on (B=8, 5, 16, 16), bf16, both windows.
for spec in "16 64" "8 128"; do
  set -- $spec
  $PYTHON bench/attention.py --device cuda --dtype bfloat16 --batch 8 --grid 5 16 16 --heads "$1" --head-dim "$2" \
    --bias --json "$out/attention_h$1_d$2.json" 2>&1 | tee "$out/attention_h$1_d$2.txt" || status=1
done
$PYTHON bench/noise.py --device cuda --json "$out/noise.json" 2>&1 | tee "$out/noise.txt" || status=1
# Probe readouts: a grid of 4 learning rates against one readout, trained on the GPU.
$PYTHON bench/probe_fit.py --device cuda --rounds 3 --json "$out/probe_fit.json" 2>&1 | tee "$out/probe_fit.txt" || status=1
echo "results in $out (exit $status)"
exit $status
