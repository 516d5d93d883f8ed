#!/usr/bin/env bash
# The GPU check, offline, within a deadline (default 540 s), in two calls of one lease (docs/GPU_CHECK.md):
#   bash bench/gpu_check.sh --wheelhouse W --out OUT --deadline 450 --build-mamba-background \
#       --only install,kernels,drills,resume,speed                                   # call 1
#   bash bench/gpu_check.sh --wheelhouse W --out OUT --deadline 240 --only parity,speed-mamba   # call 2
#   bash bench/gpu_check.sh --dry-run                         # prints the stages; exits 0 on any machine
#   bash bench/gpu_check.sh --rehearse-on-cpu --deadline 300  # both calls on a CPU (developers)
# W is made on a machine with internet by bench/gpu_wheelhouse.sh. OUT receives gpu_check.json, gpu_check.log and
# logs.tgz only. Without a GPU it exits 2 with one line. Details: bench/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
