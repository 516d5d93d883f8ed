"""The MPI ranks of a data_prep job (`mpirun -n N python -m data_prep.prepare ...`, `srun ...`).

data_prep talks MPI through mpi4py directly, not through `pipeline/comm.py`: that module speaks
torch.distributed, and tokenizing must not pay for importing torch. MPI is initialised only when a
launcher started this process (its environment says so); a plain `python -m data_prep.prepare` is a
group of one and never imports mpi4py.

Failure never hangs the job: an error found by one rank alone is printed by that rank ("error: rank
R: ...") and ends the whole job with `MPI_Abort` (`fail`); an error every rank reaches in the same
step, on the same data (`CollectiveError`), is printed once, by rank 0, which then aborts the others.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable, List, Optional

from pipeline.data.manifest import DataError

# Set by mpirun/mpiexec (MPICH's hydra, Open MPI, MVAPICH) and by `srun --mpi=pmi2|pmix`.
_LAUNCHER_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
EXIT_DATA_ERROR = 2
EXIT_BUG = 1


class CollectiveError(DataError):
    """A DataError that every rank raises at the same point (a check of the gathered counts)."""


class Group:
    """Rank, size and the few collectives data_prep needs; a group of one without a launcher."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bcast(self, value: Any = None) -> Any:
        return self.comm.bcast(value, root=0) if self.comm is not None else value

    def allgather(self, value: Any) -> List[Any]:
        return self.comm.allgather(value) if self.comm is not None else [value]

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()

    def on_root(self, function: Callable[[], Any]) -> Any:
        """`function()` on rank 0, its result on every rank (the others wait; rank 0's error aborts them)."""
        return self.bcast(function() if self.is_root else None)

    def fail(self, err: BaseException) -> None:
        """Print `err` (from this rank, or once for a CollectiveError) and end the job: never returns."""
        collective = isinstance(err, CollectiveError)
        code = EXIT_DATA_ERROR if isinstance(err, DataError) else EXIT_BUG
        if self.comm is None or self.size == 1:
            if code == EXIT_BUG:
                raise err
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(code)
        if collective and not self.is_root:
            time.sleep(60)  # rank 0 reaches the same error and aborts the job, this rank included
        where = "" if collective else f"rank {self.rank}: "
        if code == EXIT_BUG:
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        print(f"error: {where}{err}", file=sys.stderr, flush=True)
        self.comm.Abort(code)


def launched_by_mpi() -> bool:
    return any(key in os.environ for key in _LAUNCHER_ENV)


_GROUP: Optional[Group] = None


def group() -> Group:
    """The job's ranks: MPI_COMM_WORLD under a launcher, else a group of one.

    Refuses `srun` without an MPI plugin (every task would run the whole job alone, all writing the
    same folder): the SLURM step has several tasks, MPI sees one."""
    global _GROUP
    if _GROUP is None:
        comm = None
        if launched_by_mpi():
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        _GROUP = Group(comm)
        slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if "SLURM_STEP_ID" in os.environ and slurm_tasks > 1 and _GROUP.size != slurm_tasks:
            raise DataError(f"srun started {slurm_tasks} tasks but MPI sees {_GROUP.size}: run srun with an MPI "
                            "plugin (`srun --mpi=pmi2 ...`, see launch/slurm/prepare.sbatch) or use mpirun")
    return _GROUP
