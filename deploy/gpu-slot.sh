#!/bin/sh
# hardnet-gpu-slot: give this container exactly one GPU, then exec the given command.
#
# Why: `docker compose up --scale worker=N` starts N identical containers, and Docker's GPU
# reservation (`count: 1`) hands every one of them the *same* first GPU. deploy/compose.gpu.yml
# therefore reserves all GPUs for each replica and runs this script first: each replica takes an
# exclusive flock(1) on /gpu-locks/<GPU UUID>.lock (a volume shared by the replicas), exports
# CUDA_VISIBLE_DEVICES=<that UUID> and execs the worker with the lock fd still open. The kernel drops
# the lock when the worker exits, so a restarted container can take the GPU again. More replicas
# than GPUs wait here (no GPU is ever shared by two workers).
#
# Not needed on Kubernetes: the NVIDIA device plugin already gives each pod its own GPU.
#
#   HARDNET_GPU_LOCK_DIR   lock directory (default /gpu-locks)
#   HARDNET_GPU_WAIT       seconds between retries when every GPU is taken (default 30)
set -eu

lockdir="${HARDNET_GPU_LOCK_DIR:-/gpu-locks}"
wait_s="${HARDNET_GPU_WAIT:-30}"

if [ "$#" -eq 0 ]; then
    echo "usage: hardnet-gpu-slot COMMAND [ARG...]" >&2
    exit 2
fi

# UUIDs, not indices: CUDA and nvidia-smi may number GPUs differently; a UUID is unambiguous and
# CUDA_VISIBLE_DEVICES accepts it.
if ! uuids="$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null)" || [ -z "$uuids" ]; then
    echo "hardnet-gpu-slot: nvidia-smi lists no GPU (is the NVIDIA Container Toolkit set up and" \
         "the GPU reservation in effect?)" >&2
    exit 1
fi
mkdir -p "$lockdir"

while :; do
    for uuid in $uuids; do
        uuid="$(printf '%s' "$uuid" | tr -d ' \r')"
        [ -n "$uuid" ] || continue
        exec 9>>"$lockdir/$uuid.lock"
        if flock -n 9; then
            echo "hardnet-gpu-slot: ${HOSTNAME:-this container} runs on $uuid" >&2
            CUDA_VISIBLE_DEVICES="$uuid"
            export CUDA_VISIBLE_DEVICES
            exec "$@"
        fi
        exec 9>&-
    done
    echo "hardnet-gpu-slot: all GPUs are taken by other workers; retrying in ${wait_s}s" >&2
    sleep "$wait_s"
done
