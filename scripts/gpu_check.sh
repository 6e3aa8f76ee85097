#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a lent device machine (see the device tool):
# the CUDA tests (fp16 + channels_last vs CPU fp32, normalize on CUDA, GPU JPEG decode), the GPU
# decode benchmark, and the pipeline benchmark
# on CUDA for two models. Prints everything; writes nothing but its output.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
.venv/bin/python -m pytest -q -p no:cacheprovider -k "cuda" tests/unit/test_predict.py tests/unit/test_decode.py
# GPU JPEG decode: the CUDA tests print the measured nvJPEG-vs-CPU deviation (-s), then its benchmark
.venv/bin/python -m pytest -q -s -p no:cacheprovider tests/unit/test_gpu_decode.py
timeout 120 .venv/bin/python benchmarks/bench_gpu_decode.py
for m in hardnet39ds hardnet68; do
  .venv/bin/python benchmarks/bench_pipeline.py --device cuda --model "$m" --n 512 --batch-size 128 --modes b,c,model --repeat 2
done
