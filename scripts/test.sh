#!/usr/bin/env bash
# The README's test command: set up (install + build), then run the whole test suite.
# GPU tests are marked `cuda` and skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
# Two worker processes (pytest-xdist) by default: the nvcc and Triton interpreter tests are single-threaded, and on
# CI's 2 cores the suite took 1194 s in one process and 672 s in two (12-07). PYTEST_WORKERS=0 runs it in one.
"$PY" -m pytest tests -q -n "${PYTEST_WORKERS:-2}" "$@"
