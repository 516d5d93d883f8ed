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
LOST_PEER=76  # a rank lost its peers mid-collective (pipeline/comm.py): no checkpoint, but transient

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
# caller's arguments come after it and win (an explicit --train.resume gives way to the newest
# checkpoint on a restarted job: pipeline/engine/checkpoint.py).
# --kill-on-bad-exit=0: the first rank to exit 75 must not get the others killed, or srun would
# report their signal instead of 75.
srun --kill-on-bad-exit=0 ${SRUN_ARGS:-} "$PYTHON" -u launch/train.py --train.resume auto "$@" &
srun_pid=$!

# On scancel, a time limit or a preemption without --signal, SLURM sends SIGTERM to this shell and to
# every task, and SIGKILL KillWait seconds later (GraceTime first, for a preemption). Without a trap
# this shell would die at once and never requeue. The ranks checkpoint on SIGTERM themselves; a signal
# meant for this shell alone (`--signal=B:USR1@...`, `scancel --batch`) is passed on to them.
on_signal() {
  echo "job ${SLURM_JOB_ID}: SIG$1 received; the ranks checkpoint and exit, $(date '+%F %T')"
  [ "$1" = USR1 ] && kill -USR1 "$srun_pid" 2>/dev/null  # srun forwards it to every task
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
# A trapped signal interrupts `wait`: wait again until srun has really exited, then take its status.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?
echo "job ${SLURM_JOB_ID}: srun exited with code $rc, $(date '+%F %T')"

if [ "$rc" -eq "$PREEMPTED" ]; then
  echo "job ${SLURM_JOB_ID}: preempted, checkpoint saved; requeueing, $(date '+%F %T')"
  # The job goes back to the queue with the same id, log and MASTER_PORT; SLURM ends this run of it.
  scontrol requeue "$SLURM_JOB_ID" ||
    echo "job ${SLURM_JOB_ID}: scontrol requeue failed (submitted with --requeue? cancelled by scancel?);" \
         "resubmit the same script to resume" >&2
elif [ "$rc" -eq "$LOST_PEER" ]; then
  echo "job ${SLURM_JOB_ID}: a rank lost contact with its peers (a killed rank or a failed node); requeueing to" \
       "resume from the last checkpoint, $(date '+%F %T')"
  scontrol requeue "$SLURM_JOB_ID" || echo "job ${SLURM_JOB_ID}: scontrol requeue failed; resubmit to resume" >&2
fi
exit "$rc"
