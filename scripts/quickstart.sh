#!/usr/bin/env bash
# One command from a fresh clone: set up, then label the bundled sample images through the real
# system (local Redis, one Celery worker, the queue), printing each image's top-5.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hardnet demo "$@"
