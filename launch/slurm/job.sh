#!/bin/bash
# The body of launch/slurm/*.sbatch (not submitted itself): one srun task per rank, the rendezvous
# from the allocation, automatic resume, and a requeue when the ranks report a preemption.
#
# Environment (all optional): PYTHON (default .venv/bin/python if present, else python3),
# MASTER_ADDR / MASTER_PORT (default: the first node's address as SLURM knows it, a port derived
# from the job id), OMP_NUM_THREADS (default: --cpus-per-task), SRUN_ARGS (extra srun options,
# e.g. "--mpi=pmi2" or "--gpu-bind=closest").
set -uo pipefail

PREEMPTED=75  # launch/train.py's exit code after a preemption checkpoint (pipeline/engine/preemption.py)

cd "${SLURM_SUBMIT_DIR:-.}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Rank 0 runs on the first node of the allocation and hosts the rendezvous there. NodeAddr is the
# address SLURM itself uses for that node (the node name need not resolve).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
fi
# One port per job, so two jobs sharing a node do not collide; requeued runs keep their job id and port.
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 40000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# srun no longer inherits --cpus-per-task from the job (SLURM >= 22.05); pass it on explicitly.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

echo "job ${SLURM_JOB_ID} run $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_NTASKS} ranks on ${SLURM_JOB_NODELIST}," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, $(date '+%F %T')"

# launch/train.py reads its rank from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID (pipeline/comm.py).
# `--train.resume auto` first: a requeued run continues from the newest intact checkpoint; the
# caller's arguments come after it and win.
# --kill-on-bad-exit=0: the first rank to exit 75 must not get the others killed, or srun would
# report their signal instead of 75.
srun --kill-on-bad-exit=0 ${SRUN_ARGS:-} "$PYTHON" -u launch/train.py --train.resume auto "$@"
rc=$?

if [ "$rc" -eq "$PREEMPTED" ]; then
  echo "job ${SLURM_JOB_ID}: preempted, checkpoint saved; requeueing, $(date '+%F %T')"
  # The job goes back to the queue with the same id, log and MASTER_PORT; SLURM ends this run of it.
  scontrol requeue "$SLURM_JOB_ID" ||
    echo "job ${SLURM_JOB_ID}: scontrol requeue failed (submitted with --requeue?); resubmit to resume" >&2
fi
exit "$rc"
