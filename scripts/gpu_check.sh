#!/usr/bin/env bash
# The checks that need a GPU, as one prepared script for a lent H100/H200 (the device tool), in
# under 8 minutes: the CUDA tests (device stage, fp16/channels_last vs CPU fp32, normalize on CUDA,
# GPU JPEG decode with its hazard test), the GPU benchmark table (benchmarks/bench_gpu.py) and the
# engine's own ceiling on the host's CPUs (benchmarks/bench_engine.py ceiling).
#
# That machine reaches no registry and has its own torch but not our queue stack: build the kit
# here first (git-ignored, ~42 MB), then run this there with the kit carried:
#
#   ../shared/gpu-kit.sh                 # here, once: .gpu-kit/ (cp312 wheels + redis-server .deb)
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu-kit"], timeout_s=540)
#
# Results go to $OUT/gpu_check.txt (the device tool brings $OUT back) or ./gpu_check.txt.
# Nothing is installed into the system: wheels go to /tmp/site, redis to /tmp/redis.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-.}/gpu_check.txt"
exec > >(tee "$RES") 2>&1
PY=python3
KIT=.gpu-kit
if [ -d "$KIT/whl" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$KIT"/whl/*.whl || echo "kit: pip install failed"
  export PYTHONPATH="$PWD:/tmp/site"
  for f in "$KIT"/deb/*.deb; do dpkg -x "$f" /tmp/redis; done
  export PATH="$PWD/$KIT/bin:$PATH"
else
  # a machine with our stack installed (e.g. a dev box with a GPU): use the project's venv
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HARDNET_TUNE_MALLOC=1
echo "### $(date -u +%FT%TZ) gpu_check"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
command -v redis-server || echo "no redis-server: the end-to-end rows will fail"

echo "### CUDA tests"
timeout 180 $PY -m pytest -q -s -p no:cacheprovider -o addopts="" \
  tests/unit/test_engine.py tests/unit/test_predict.py tests/unit/test_decode.py tests/unit/test_gpu_decode.py \
  -k "cuda or gpu" || echo "CUDA tests: rc=$?"

echo "### GPU decode benchmark"
timeout 60 $PY benchmarks/bench_gpu_decode.py --n 1000 || echo "bench_gpu_decode: rc=$?"

echo "### benchmark table"
timeout 330 $PY benchmarks/bench_gpu.py --device cuda --n-e2e 20000 --seconds 4 --naive-seconds 15 \
  --out "${OUT:-.}/bench_gpu_table.md" || echo "bench_gpu: rc=$?"
echo "### engine ceiling on this host's CPUs (zero-cost stages; last, so that it is what a timeout cuts)"
timeout 75 $PY benchmarks/bench_engine.py --scenarios ceiling --repeat 2 --ceiling-variants 256,256:all \
  || echo "bench_engine ceiling: rc=$?"
echo "### $(date -u +%FT%TZ) end"
