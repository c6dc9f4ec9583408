#!/usr/bin/env bash
# Every GPU check, as one script for a lent GPU machine (device tool), from the repository root:
#   tests/test_gpu.py (CUDA, float32 and bfloat16 against the CPU and Hugging Face), benchmarks/gpu.py
#   (capture cost on real model shapes), benchmarks/byte_level.py on a random-init 1B-shaped model.
# The machine has torch/transformers/xarray but no registry: carry `.whl` (wheels of the other
# packages, for its Python 3.12: see benchmarks/RESULTS.md, GPU section) and `.gpucache` (SmolLM2's
# tokenizer files, copied from ~/.cache/workbench/models/smollm2-135m). Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD WORKBENCH_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, transformer_lens, nnsight, xarray, zarr
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs 2>&1 | tee "$OUT/tests.log"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/gpu.py ${BENCH_ARGS:---rounds 5} 2>&1 | tee "$OUT/bench.log"
timeout ${BYTES_TIMEOUT:-120} python3 benchmarks/byte_level.py --model random-llama-1b --device cuda --bytes 200 \
  --naive-every 20 2>&1 | tee "$OUT/byte_level.log"
