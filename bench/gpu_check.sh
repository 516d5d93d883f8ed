#!/usr/bin/env bash
# The GPU check, offline, in one command (on one GPU, with mamba-ssm built on the spot):
#   bash bench/gpu_check.sh --wheelhouse DIR [--only STAGE[,STAGE]] [--out DIR] [--causal-conv1d]
#   bash bench/gpu_check.sh --dry-run          # prints the stages; exits 0 on any machine
# Stages: install (from DIR, never torch), drills (fp16 NaN / inf-gradient drills through launch/train.py),
# resume (stop + bit-exact resume), parity (mamba-ssm vs PyTorch Mamba), speed (tokens/s and MFU vs a same-size
# Transformer with PASS/FAIL targets, per-component breakdown, launch/train.py vs the bare step).
# Without a GPU it exits 2 with one line. DIR is made on a machine with internet by bench/gpu_wheelhouse.sh.
# Details: bench/gpu_check.py --help and the README's "GPU check" section.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
