#!/usr/bin/env bash
# Installs the pinned dependencies and builds lora_ext in place (editable).
# Safe to re-run: pip skips what is already there and ninja rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and alone: peft/transformers would otherwise pull a multi-GB CUDA build.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -r requirements-ci.txt
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import lora_ext, torch; print('lora_ext ready: torch', torch.__version__)"
