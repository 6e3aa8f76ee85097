#!/usr/bin/env bash
# The test command (README, and .ci/run). Sets up what is missing, then runs the whole suite.
# Every server the tests need (redis-server on a free port, moto's S3 server, workers) is started
# by the tests themselves on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# --durations: the slowest tests named in every run (CI included), to keep the suite within its budget
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"
