#!/usr/bin/env bash
# Create .venv and install gram-scale with its test and benchmark extras.
# Machines without a GPU get the CPU build of torch 2.13.0 first, so nothing pulls a CUDA build;
# a torch already in .venv (e.g. a CUDA build on a GPU node) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch
  else
    .venv/bin/python -m pip install -q torch==2.13.0
  fi
fi
TORCH_VERSION="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
echo "torch==${TORCH_VERSION}" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -c launch/constraints.txt -e ".[test,bench]"
# Without a GPU, DeepSpeed JIT-compiles its CPU ops (shm comm for every start, CPU Adam for
# offload) on first use: about a minute on 2 cores. Build them now into TORCH_EXTENSIONS_DIR
# (torch's default cache when unset), so no run, test or benchmark waits for the compiler.
.venv/bin/python - <<'PY'
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        get_accelerator().create_op_builder(name).load(verbose=False)
PY
echo "gram-scale installed in .venv (torch ${TORCH_VERSION})"
