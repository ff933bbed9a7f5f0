#!/usr/bin/env bash
# The README's test command: set up (install + build), then run the whole test suite.
# GPU tests are marked `cuda` and skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
"$PY" -m pytest tests -q "$@"
