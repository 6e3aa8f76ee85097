#!/usr/bin/env bash
# The device run, rehearsed on this CPU host with what the device has (issue 18): Python 3.12,
# torch 2.11.0 / torchvision 0.26.0, the image's own packages that we use, our stack only from the
# kit, installed by scripts/gpu_check.sh itself. One command:
#
#   scripts/gpu_rehearsal.sh [--rebuild-kit]
#
# Steps (each one's wall time is printed at the end):
#   venv      $HNQ_REHEARSAL_VENV if set (e.g. /work/rehearsal-venv), else .rehearsal/venv, created
#             with /root/.pyenv/versions/3.12.1/bin/python or python3.12 and torch==2.11.0
#             torchvision==0.26.0; its versions are checked either way
#   image     the device image's packages that the check uses and the kit leaves out (pytest,
#             pytest-timeout, prometheus-client, pyarrow; KINDS.md lists them there), into
#             .rehearsal/image-site, once
#   kit       .gpu-kit/ from ../shared/gpu-kit.sh, if missing (or --rebuild-kit)
#   size      tracked + untracked-not-ignored files + .gpu-kit <= 64 MiB (what the device tool carries)
#   check     scripts/gpu_check.sh --cpu: kit install, smoke (every module imports, one eager batch),
#             the four CUDA test files collected, bench_gpu --device cpu --quick, the compiled row,
#             the ceiling: the same steps, budgets (x GPU_CHECK_SCALE, 2 here) and process-group
#             handling as on the device
#   no-redis  bench_gpu --device cpu --quick again with no redis-server on PATH: the end-to-end and
#             naive rows fail softly, the table is still written, rc 0
# GPU_CHECK_ARGS=--no-compile leaves out the compile step (a cold torch.compile of hardnet39ds on
# 2 shared cores outlasts its 200 s budget: the step then shows the SIGINT / kill path instead).
# Everything it writes is under .rehearsal/ (git-ignored); the outputs in .rehearsal/out-*/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
R=$ROOT/.rehearsal
mkdir -p "$R"
REBUILD=0
[ "${1:-}" = --rebuild-kit ] && REBUILD=1
VENV=${HNQ_REHEARSAL_VENV:-$R/venv}
PY=$VENV/bin/python
IMAGE_SITE=$R/image-site
TIMES=()
FAILED=0
timed() {   # timed NAME CMD...: run, remember the wall time and the outcome
  local name=$1; shift
  local s; s=$(date +%s%N)
  echo "=== $(date -u +%FT%TZ) $name"
  "$@"; local rc=$?
  local ds=$(( ($(date +%s%N) - s) / 100000000 ))
  TIMES+=("$(printf '| %-9s | %6s s | %s |' "$name" "$((ds / 10)).$((ds % 10))" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")")")
  [ $rc = 0 ] || FAILED=1
  return $rc
}

venv() {
  if [ ! -x "$PY" ]; then
    local base=/root/.pyenv/versions/3.12.1/bin/python
    [ -x "$base" ] || base=$(command -v python3.12) || { echo "no Python 3.12 here"; return 1; }
    "$base" -m venv "$VENV" && "$PY" -m pip install -q torch==2.11.0 torchvision==0.26.0 || return 1
  fi
  "$PY" - <<'EOF'
import sys, torch, torchvision
v = (sys.version.split()[0], torch.__version__, torchvision.__version__)
print("venv: python %s, torch %s, torchvision %s" % v)
ok = v[0].startswith("3.12.") and v[1].split("+")[0] == "2.11.0" and v[2].split("+")[0] == "0.26.0"
sys.exit(0 if ok else "venv: not Python 3.12 + torch 2.11.0 + torchvision 0.26.0 (the device's)")
EOF
}

image() {
  if [ ! -f "$IMAGE_SITE/.done" ]; then
    rm -rf "$IMAGE_SITE"
    "$PY" -m pip install -q --target "$IMAGE_SITE" pytest pytest-timeout prometheus-client pyarrow || return 1
    touch "$IMAGE_SITE/.done"
  fi
  echo "image: $(ls "$IMAGE_SITE" | grep -c dist-info) distributions in $IMAGE_SITE"
}

kit() {
  if [ "$REBUILD" = 1 ] || [ ! -d .gpu-kit/whl ] || [ -z "$(ls .gpu-kit/deb 2>/dev/null)" ]; then
    bash ../shared/gpu-kit.sh || return 1
  fi
  echo "kit: $(ls .gpu-kit/whl | wc -l) wheels, $(ls .gpu-kit/deb | wc -l) debs, $(du -sh .gpu-kit | cut -f1)"
}

size() {   # what the device tool carries: tracked and untracked-not-ignored files, plus the kit
  local tree kitb
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
         | awk '{s += $1} END {print s + 0}')
  kitb=$(du -sb .gpu-kit | cut -f1)
  echo "size: tree $((tree / 1048576)) MiB + kit $((kitb / 1048576)) MiB = $(( (tree + kitb) / 1048576 )) MiB (limit 64)"
  [ $((tree + kitb)) -le $((64 * 1048576)) ]
}

check() {
  rm -rf "$R/out-normal"
  OUT=$R/out-normal HNQ_PYTHON=$PY HNQ_KIT_SITE=$R/site GPU_CHECK_SCALE=${GPU_CHECK_SCALE:-2} \
    PYTHONPATH=$IMAGE_SITE bash scripts/gpu_check.sh --cpu ${GPU_CHECK_ARGS:-}
}

no_redis() {
  # PATH with every folder that holds redis-server replaced by a copy of it (symbolic links) without it
  local d n=0 path=() shadow=$R/no-redis-path
  rm -rf "$shadow"
  IFS=: read -ra dirs <<<"$PATH"
  for d in "$ROOT/.gpu-kit/bin" "${dirs[@]}"; do
    if [ -e "$d/redis-server" ]; then
      [ "$d" = "$ROOT/.gpu-kit/bin" ] && continue
      n=$((n + 1)); mkdir -p "$shadow/$n"
      find "$d" -maxdepth 1 -mindepth 1 ! -name 'redis-*' -exec ln -s {} "$shadow/$n/" \;
      path+=("$shadow/$n")
    else
      path+=("$d")
    fi
  done
  local P; P=$(IFS=:; echo "${path[*]}")
  if PATH=$P command -v redis-server; then echo "no-redis: redis-server still on PATH"; return 1; fi
  rm -rf "$R/out-no-redis"
  PATH=$P PYTHONPATH="$ROOT:$R/site:$IMAGE_SITE" PYTHONUNBUFFERED=1 HNQ_CHILD_PGIDS=$R/no-redis-pgids \
    timeout -s INT -k 15 300 "$PY" -m benchmarks.bench_gpu --device cpu --quick --models hardnet39ds \
    --no-compile --naive-seconds 3 --out "$R/out-no-redis/bench_gpu.md" || return 1
  grep -q "redis-server is not installed" "$R/out-no-redis/bench_gpu.md" \
    || { echo "no-redis: expected the end-to-end rows to fail on the missing redis-server"; return 1; }
}

T0=$(date +%s)
echo "gpu_rehearsal $(date -u +%FT%TZ) on $(hostname): $(nproc) CPUs; venv $VENV"
timed venv venv || { printf '%s\n' "${TIMES[@]}"; exit 1; }
timed image image || { printf '%s\n' "${TIMES[@]}"; exit 1; }
timed kit kit || { printf '%s\n' "${TIMES[@]}"; exit 1; }
timed size size
timed check check
timed no-redis no_redis
echo
echo "=== the table, redis-server present (.rehearsal/out-normal/bench_gpu.md)"
cat "$R/out-normal/bench_gpu.md" 2>/dev/null
echo "=== gpu_check's steps (.rehearsal/out-normal/gpu_check_steps.md)"
cat "$R/out-normal/gpu_check_steps.md" 2>/dev/null
echo "=== the table, no redis-server on PATH (.rehearsal/out-no-redis/bench_gpu.md)"
cat "$R/out-no-redis/bench_gpu.md" 2>/dev/null
echo "=== rehearsal steps, wall time ($(( $(date +%s) - T0 ))s in all)"
echo "| step | wall | outcome |"
echo "|---|---|---|"
printf '%s\n' "${TIMES[@]}"
exit $FAILED
