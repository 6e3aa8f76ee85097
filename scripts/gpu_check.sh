#!/usr/bin/env bash
# The checks that need a GPU, as one prepared script for a lent H100/H200 (the device tool): at most
# 7 minutes in all (GPU_CHECK_BUDGET, 400 s, plus one step's 15 s kill grace), a cold compile included.
#
#   ../shared/gpu-kit.sh          # here, once: .gpu-kit/ (cp312 wheels + redis-server .deb, ~46 MB)
#   scripts/gpu_rehearsal.sh      # here: this same script on the CPU, Python 3.12 + torch 2.11
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu-kit"], timeout_s=480)
#
# Stages, in order (each step has its own budget, `timeout -s INT -k 15`, cut to what is left of
# the whole; a step that no longer fits is written as skipped):
#   kit      pip-installs the kit's wheels into $HNQ_KIT_SITE (/tmp/site) and unpacks redis into
#            /tmp/redis; a failure stops the run at once (every later step would be ImportErrors)
#   smoke    nvidia-smi, `redis-server --version`, then `bench_gpu --smoke` (every module imports,
#            one eager and one CUDA-graph batch, the nvJPEG probe): stops at the first failure
#   tests    the CUDA tests of the four files that have them (device stage, fp16 vs fp32,
#            normalize on CUDA, GPU JPEG decode and its hazard test)
#   decode   benchmarks/bench_gpu_decode.py
#   table    benchmarks/bench_gpu.py --no-compile (model limits eager / CUDA graphs, decode limits,
#            end to end with CPU and GPU decoding, the naive worker)
#   compile  the compiled model-limit row, last but one (a cold compile is the slowest step)
#   ceiling  the engine's own ceiling on the host's CPUs (bench_engine ceiling), with what is left
#
# Every row is written to $OUT as soon as it exists: gpu_check_steps.md (one row per step: status,
# seconds, budget), bench_gpu.md + bench_gpu.jsonl (one row per measurement), gpu_check.txt (all
# output), logs.tgz (worker / redis logs, at the end). Without $OUT: ./gpu_check_out/.
#
# Children: the worker, the naive worker and redis-server run in sessions of their own, out of reach
# of `timeout`'s signal to its process group. bench_gpu lists their process groups in
# $HNQ_CHILD_PGIDS; after every step (and on INT/TERM/EXIT of this script) those still alive are
# killed, and so is any process left carrying the step's HNQ_STEP_TAG in its environment.
#
#   --cpu         rehearsal on a CPU host (scripts/gpu_rehearsal.sh): CUDA-only checks are skipped,
#                 the CUDA tests are collected, not run, and the table is `--device cpu --quick`
#   --no-compile  leave out the compile step
# Env: HNQ_PYTHON (python3), HNQ_KIT (.gpu-kit), HNQ_KIT_SITE (/tmp/site), GPU_CHECK_BUDGET (400),
# GPU_CHECK_SCALE (1; multiplies every budget: the CPU rehearsal's 2 shared cores are slower).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CPU=0 COMPILE=1
for arg in "$@"; do
  case $arg in
    --cpu) CPU=1 ;;
    --no-compile) COMPILE=0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
OUTDIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.txt") 2>&1
PY=${HNQ_PYTHON:-python3}
KIT=${HNQ_KIT:-.gpu-kit}
SITE=${HNQ_KIT_SITE:-/tmp/site}
SCALE=${GPU_CHECK_SCALE:-1}       # the rehearsal's 2 shared cores: every budget x SCALE
BUDGET=$(( ${GPU_CHECK_BUDGET:-400} * SCALE ))
GRACE=15
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PGIDS=$WORK/child_pgids
STEPS=$OUTDIR/gpu_check_steps.md
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HARDNET_TUNE_MALLOC=1 TMPDIR=$WORK
printf '| step | status | seconds | budget |\n|---|---|---|---|\n' >"$STEPS"

# -- children --------------------------------------------------------------------------------
reap() {   # kill what a step left: the process groups it listed, then anything with its tag
  local tag=${1:-} g p pids=()
  if [ -s "$PGIDS" ]; then
    while read -r g; do
      [ -n "$g" ] && [ "$g" -gt 1 ] && kill -0 -- "-$g" 2>/dev/null && { kill -TERM -- "-$g" 2>/dev/null; pids+=("$g"); }
    done <"$PGIDS"
  fi
  if [ -n "$tag" ]; then
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      [ "$p" = $$ ] && continue
      tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx "HNQ_STEP_TAG=$tag" && { kill -TERM "$p" 2>/dev/null; pids+=("p$p"); }
    done
  fi
  [ ${#pids[@]} -eq 0 ] && return 0
  echo "reap: stopping ${#pids[@]} left-over process(es)/group(s): ${pids[*]}"
  sleep 2
  for g in "${pids[@]}"; do
    case $g in p*) kill -KILL "${g#p}" 2>/dev/null ;; *) kill -KILL -- "-$g" 2>/dev/null ;; esac
  done
  : >"$PGIDS"
}
finish() {
  local rc=$?
  trap - EXIT INT TERM
  reap "${CUR_TAG:-}"
  (cd "$WORK" && find . -name '*.log' -size -4M | tar czf "$OUTDIR/logs.tgz" -T - 2>/dev/null)
  echo "### $(date -u +%FT%TZ) end: $(( $(date +%s) - T0 ))s in all"
  rm -rf "$WORK"
  exit "$rc"
}
trap finish EXIT
trap 'echo "gpu_check: interrupted"; exit 130' INT TERM

# -- steps -----------------------------------------------------------------------------------
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >>"$STEPS"; echo "### step $1: $2 (${3}s of ${4}s)"; }
STEP_RC=0
step() {   # step NAME BUDGET CMD...: run CMD within min(BUDGET, what is left), then reap its children
  local name=$1 want=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) - GRACE )) b=$want
  [ "$b" -gt "$left" ] && b=$left
  if [ "$b" -lt 5 ]; then row "$name" "skipped: ${left}s left of the run's ${BUDGET}s" 0 "$want"; STEP_RC=0; return 0; fi
  echo "### $(date -u +%FT%TZ) step $name (budget ${b}s): $*"
  CUR_TAG="$name.$$.$RANDOM"
  : >"$PGIDS"
  local s; s=$(date +%s%N)
  HNQ_STEP_TAG=$CUR_TAG HNQ_CHILD_PGIDS=$PGIDS timeout -s INT -k "$GRACE" "$b" "$@"
  STEP_RC=$?
  reap "$CUR_TAG"; CUR_TAG=
  local ds=$(( ($(date +%s%N) - s) / 100000000 )) secs
  secs="$((ds / 10)).$((ds % 10))"
  case $STEP_RC in
    0) row "$name" ok "$secs" "$b"; return 0 ;;
    124) row "$name" "**failed**: out of its budget (SIGINT at ${b}s)" "$secs" "$b" ;;
    137) row "$name" "**failed**: killed ${GRACE}s after SIGINT at ${b}s" "$secs" "$b" ;;
    *) row "$name" "**failed**: rc=$STEP_RC" "$secs" "$b" ;;
  esac
  FAILED_STEPS+=("$name")
  return "$STEP_RC"
}
FAILED_STEPS=()
stop() { row "$1" "**stopped the run**: $2" 0 0; echo "gpu_check: STOPPED: $2"; exit 1; }

echo "### $(date -u +%FT%TZ) gpu_check $* (budget ${BUDGET}s, scale ${SCALE}; rows in $OUTDIR)"

# -- kit -------------------------------------------------------------------------------------
if [ -d "$KIT/whl" ]; then
  install_kit() {
    rm -rf "$SITE" && mkdir -p "$SITE" /tmp/redis || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$KIT"/whl/*.whl || return 1
    local f; for f in "$KIT"/deb/*.deb; do dpkg -x "$f" /tmp/redis || return 1; done
  }
  # a function cannot run under timeout: the steps run in this shell's child, timed by step's clock
  export -f install_kit; export PY KIT SITE
  step kit 60 bash -c install_kit || stop kit "the kit did not install ($KIT -> $SITE): nothing else can run"
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$ROOT/$KIT/bin:$PATH"
elif [ "$CPU" = 1 ]; then
  stop kit "no $KIT/whl: build it with ../shared/gpu-kit.sh (the rehearsal installs it as the device does)"
else
  # a machine with our stack installed (e.g. a dev box with a GPU): the project's venv
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  export PYTHONPATH="$ROOT"
  row kit "no $KIT: using $PY" 0 0
fi

# -- smoke: stop at the first failure ------------------------------------------------------------
DEV=cuda
[ "$CPU" = 1 ] && DEV=cpu
if [ "$CPU" = 1 ]; then
  row nvidia-smi "skipped (--cpu)" 0 0
else
  step nvidia-smi 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    || stop nvidia-smi "no GPU answered"
fi
step redis-server 5 redis-server --version || stop redis-server "no working redis-server on PATH (the end-to-end rows need it)"
step smoke 30 "$PY" -m benchmarks.bench_gpu --smoke --device "$DEV" || stop smoke "a smoke check failed (above)"

# -- the measurements ----------------------------------------------------------------------------
TESTS=(tests/unit/test_engine.py tests/unit/test_predict.py tests/unit/test_decode.py tests/unit/test_gpu_decode.py)
if [ "$CPU" = 1 ]; then
  step tests-collected 60 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --collect-only "${TESTS[@]}" -k "cuda or gpu"
  row decode "skipped (--cpu: bench_gpu_decode needs CUDA)" 0 0
else
  step tests 75 "$PY" -m pytest -q -s -p no:cacheprovider -o addopts="" "${TESTS[@]}" -k "cuda or gpu"
  step decode 30 "$PY" -m benchmarks.bench_gpu_decode --n 1000 --repeat 2
fi
if [ "$CPU" = 1 ]; then
  TABLE=(--device cpu --quick --models hardnet39ds --naive-seconds 3 --e2e-timeout 60 --ready-timeout 60)
  COMPILED=(--device cpu --quick --models hardnet39ds --compile-models hardnet39ds --seconds 1)
else
  TABLE=(--device cuda --n-e2e 20000 --seconds 4 --naive-seconds 10 --e2e-timeout 60 --ready-timeout 60)
  COMPILED=(--device cuda --models hardnet68 --compile-models hardnet68 --seconds 4)
fi
step table 170 "$PY" -m benchmarks.bench_gpu --no-compile "${TABLE[@]}" --out "$OUTDIR/bench_gpu.md"
if [ "$COMPILE" = 1 ]; then
  step compile 100 "$PY" -m benchmarks.bench_gpu --compiled-only "${COMPILED[@]}" --append --out "$OUTDIR/bench_gpu.md"
else
  row compile "skipped (--no-compile)" 0 0
fi
step ceiling 45 "$PY" -m benchmarks.bench_engine --scenarios ceiling --repeat 1 --ceiling-variants 256,256:all
[ -f "$OUTDIR/bench_gpu.md" ] && { echo "### the table ($OUTDIR/bench_gpu.md)"; cat "$OUTDIR/bench_gpu.md"; }
echo "### steps ($STEPS)"; cat "$STEPS"
[ ${#FAILED_STEPS[@]} -eq 0 ] || { echo "gpu_check: failed steps: ${FAILED_STEPS[*]}"; exit 1; }
exit 0
