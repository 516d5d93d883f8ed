#!/usr/bin/env bash
# Fill a wheelhouse for bench/gpu_check.sh on a machine with internet, for a GPU machine without it.
#   bash bench/gpu_wheelhouse.sh DIR [PYTHON_VERSION]     # PYTHON_VERSION of the GPU machine, default 3.12
# Holds: a deepspeed wheel built without ops (DS_BUILD_OPS=0: pure Python, JIT ops on the GPU machine),
# the pure-Python and manylinux wheels the pipeline imports, and the source distributions of mamba-ssm and
# causal-conv1d (compiled on the GPU machine for its own architecture). Never torch: the GPU machine keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: bash bench/gpu_wheelhouse.sh DIR [PYTHON_VERSION]}
PYV=${2:-3.12}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==0.19.8"
"$PY" -m pip download -q --no-deps -d "$DIR" --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  jsonargparse docstring-parser typeshed-client hjson einops msgpack py-cpuinfo psutil ninja pydantic \
  pydantic-core annotated-types typing-inspection typing-extensions PyYAML sentencepiece
# The *_SKIP_CUDA_BUILD switches let their setup.py report metadata on a machine without nvcc.
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
  "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d "$DIR" "mamba-ssm==2.3.1" "causal-conv1d==1.6.0"
ls -la "$DIR"
