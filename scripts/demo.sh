#!/usr/bin/env bash
# The README's demo command: set up (install + build), then fine-tune a small Llama with LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
"$PY" examples/finetune_llama.py "$@"
