#!/usr/bin/env bash
# Idempotent setup of a development/CI machine: redis-server (apt) and .venv with everything.
# Re-running is cheap: the venv is reinstalled only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# Headless Chromium renders `hardnet report` pages in the tests (tests/integration/test_outputs.py
# skips that check, saying why, where it is missing). Optional: no apt, no Chromium, no failure.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (headless rendering of the report in the tests)" >&2
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
      || echo "[setup] could not install chromium; the report rendering test will be skipped" >&2
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.hardnet-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing hardnet-queue and its dependencies into .venv (torch is large: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # pip (not uv/poetry): it takes the pinned torch/torchvision wheels from the local disk where present.
  .venv/bin/python -m pip install -q -e '.[worker,test,parquet,monitor]'
  echo "$want" > "$stamp"
fi
# Our own modules' bytecode, as `pip install` gives an installed package: an editable install
# writes none where PYTHONDONTWRITEBYTECODE is set (this machine, CI), and then every `hardnet`
# process compiled them again (0.33 -> 0.27 s for `hardnet status` here). Stale files are ignored.
.venv/bin/python -m compileall -q -j 0 hnq producer worker >/dev/null || true
