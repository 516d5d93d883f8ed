#!/usr/bin/env bash
# Fill a pinned offline wheelhouse for bench/gpu_check.sh on a machine with internet, for a GPU machine without it.
#   bash bench/gpu_wheelhouse.sh DIR [PYTHON_VERSION]     # PYTHON_VERSION of the GPU machine, default 3.12
# Builds with $PYTHON (default .venv/bin/python, else python3), which needs torch, pip >= 23.1 and setuptools >= 70.1
# (or wheel). Resolves the full dependency closure of bench/gpu_requirements.txt with pip's resolver for CPython
# PYTHON_VERSION on manylinux x86_64; never torch, triton or numpy. Details: bench/gpu_wheelhouse.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then PYTHON=python3; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
PYTHON="$PYTHON" exec "$PYTHON" bench/gpu_wheelhouse.py "$@"
