#!/usr/bin/env bash
# GPU check: the test suite and the bench on cupy, jax (CUDA) and torch (CUDA), on a machine
# with an NVIDIA GPU. Run from the repository root:  bash benchmarks/gpu_check.sh
# Figures land in ${OUT:-gpu_check_out}/. Each backend is tried on its own; one that cannot
# be installed or finds no GPU is reported and skipped, never counted as passed.
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pip install -q -e '.[test]' || exit 1
python -m pip install -q cupy-cuda12x 'jax[cuda12]' 2>&1 | tail -3

tests="tests/test_llama_parity.py tests/test_attention_layout.py tests/test_api.py tests/test_sampling.py tests/test_bad_input.py"
for backend in cupy jax torch; do
  echo "=== $backend"
  if ! python -c "from nanovllm.backend import get_backend as g; b = g('$backend', 'gpu'); \
print(b.describe())" 2>&1 | tee "$out/$backend-device.txt"; then
    echo "$backend: no GPU backend here (see $out/$backend-device.txt)"; continue
  fi
  NANOVLLM_BACKEND=$backend timeout 900 python -m pytest -q -x -p no:cacheprovider $tests \
    2>&1 | tail -5 | tee "$out/$backend-tests.txt"
  timeout 900 python -m nanovllm bench --backend "$backend" --device gpu --repeats 3 \
    --num-requests 64 2>&1 | grep -v Dequantizing | tee "$out/$backend-bench.txt"
done
timeout 600 python -m nanovllm bench --backend numpy --repeats 3 2>&1 | grep -v Dequantizing \
  | tee "$out/numpy-bench.txt"
