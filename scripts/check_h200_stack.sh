#!/usr/bin/env bash
# The H200's software stack on a CPU machine: torch 2.11.0+cu130 and triton 3.6.0 (what the device
# tool's GPU runs; CI runs torch 2.13 / triton 3.9) in a separate venv, lora_ext built *with* its
# CUDA kernels for sm_90 against that torch (as scripts/h200_run.sh builds it there), then the
# whole test suite (GPU tests skip). Catches torch-2.11 API differences, build breaks and
# triton-3.6 codegen differences (tests/test_triton_compile.py compiles for sm_90) before device
# time is spent on them. Needs network (~2.6 GB of wheels, cached by pip) and nvcc (CUDA_HOME).
# Usage: bash scripts/check_h200_stack.sh [pytest args]; VENV picks the venv (reused when present).
# The build goes to a clean clone of HEAD (committed code only), so the working tree's _C.so stays.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/lora_ext_h200_stack}
WORK=${WORK:-/tmp/lora_ext_h200_stack_src}
if [[ ! -x $VENV/bin/python ]]; then python3 -m venv "$VENV"; fi
PY=$VENV/bin/python
# torch 2.11 wants setuptools < 82; triton 3.6's interpreter converts 1-element arrays with int(),
# which numpy >= 2.4 refuses ("only 0-dimensional arrays ..."): both pinned below what CI uses.
constraints=$(mktemp)
printf 'torch==2.11.0\ntriton==3.6.0\nnumpy<2.4\nsetuptools<82\n' > "$constraints"
"$PY" -m pip install -q -c "$constraints" torch triton numpy setuptools
grep -vE '^(triton|numpy|setuptools)==' requirements-ci.txt | "$PY" -m pip install -q -c "$constraints" -r /dev/stdin
"$PY" -c "import torch, triton; print('stack: torch', torch.__version__, 'triton', triton.__version__)"

rm -rf "$WORK" && git clone -q . "$WORK" && cd "$WORK"
# The CUDA wheels ship cuSPARSE/cuBLAS/cuSOLVER headers (ATen/cuda includes them) under nvidia/cu13.
nvidia_include=$("$PY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'include'))")
export CPATH=$nvidia_include${CPATH:+:$CPATH} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build.log 2>&1 \
  || { tail -30 build.log; exit 1; }
grep "lora_ext: building" build.log
PYTHONPATH=$PWD "$PY" -c "import lora_ext; assert lora_ext._C.has_cuda(), 'built without CUDA'; print('native CUDA kernels built')"
PYTHONPATH=$PWD "$PY" -m pytest tests -q -p no:cacheprovider "$@"
