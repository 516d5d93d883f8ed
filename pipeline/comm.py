"""Every collective of the pipeline goes through here.

NCCL only communicates tensors on the accelerator and gloo only CPU tensors; a tensor on the wrong
side fails at run time (`No backend type associated with device type cpu`), and tests on gloo alone
never see it. So each function below moves its input to the process group's device (`device()`),
communicates, and hands the result back on the device the caller names (by default the input's).
Without an initialised process group every function acts as a group of one.

`init_distributed()` starts the group under whichever launcher started this process (the one MPI
collective of the pipeline, the master port's broadcast under mpirun, is here too).
"""
from __future__ import annotations

import atexit
import contextlib

import json
import os
import re
import socket
from typing import Optional

import torch
import torch.distributed as dist

from pipeline.config import ConfigError

# Backends whose collectives take host tensors; every other backend (nccl, hccl, xccl, ...)
# communicates on the accelerator that DeepSpeed has bound this process to.
_HOST_BACKENDS = ("gloo", "mpi")

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """The device the default process group communicates on."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if backend in _HOST_BACKENDS:
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _to_comm(tensor: torch.Tensor) -> torch.Tensor:
    # A private copy: collectives write in place, and the caller's tensor must stay as it was.
    return tensor.detach().to(device(), copy=True).contiguous()


def all_reduce(tensor: torch.Tensor, op: str = "sum", out_device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The elementwise `op` ("sum", "max", "min") of `tensor` over all ranks, as a new tensor."""
    work = _to_comm(tensor)
    if dist.is_initialized():
        dist.all_reduce(work, op=_OPS[op])
    return work.to(out_device if out_device is not None else tensor.device)


def all_gather(tensor: torch.Tensor, out_device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Every rank's `tensor` stacked along a new leading axis of length world size."""
    work = _to_comm(tensor)
    if dist.is_initialized():
        parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, work)
        gathered = torch.stack(parts)
    else:
        gathered = work.unsqueeze(0)
    return gathered.to(out_device if out_device is not None else tensor.device)


def broadcast(tensor: torch.Tensor, src: int = 0, out_device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank, as a new tensor."""
    work = _to_comm(tensor)
    if dist.is_initialized():
        dist.broadcast(work, src=src)
    return work.to(out_device if out_device is not None else tensor.device)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s JSON-serialisable `obj` on every rank (the others pass anything, e.g. None).

    Two tensor broadcasts, the length and then the UTF-8 bytes, so it runs on any backend.
    """
    rank, _ = world()
    data = json.dumps(obj).encode() if rank == src else b""
    length = int(broadcast(torch.tensor([len(data)], dtype=torch.int64), src=src).item())
    payload = torch.tensor(list(data), dtype=torch.uint8) if rank == src else torch.zeros(length, dtype=torch.uint8)
    return json.loads(bytes(broadcast(payload, src=src).tolist()).decode())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one: for decisions every rank must share."""
    return bool(all_reduce(torch.tensor([float(flag)]), op="max").item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class PeerFailed(RuntimeError):
    """Another rank failed a check this rank passed; the message is that rank's own."""


@contextlib.contextmanager
def fail_together(*errors: type):
    """Collective: an error of one of `errors` raised inside the block on any rank is raised on every
    rank, with the lowest failing rank's message (and its type where this rank knows it).

    For work some ranks do alone (shard checksums on one rank per node, a conversion on rank 0): a
    rank that fails alone would leave the others waiting in their next collective."""
    rank, world_size = world()
    failure = None
    try:
        yield
    except errors as err:
        failure = err
    first = int(all_reduce(torch.tensor([float(rank if failure is not None else world_size)]), op="min").item())
    if first == world_size:
        return
    kind, message = broadcast_object([type(failure).__name__, str(failure)] if rank == first else None, src=first)
    if failure is not None and rank == first:
        raise failure
    known = {cls.__name__: cls for cls in errors}
    raise known.get(kind, PeerFailed)(f"rank {first}: {message}")


# EX_PROTOCOL from sysexits.h: a peer went away mid-collective. Transient (a node failure, a killed
# rank): the batch scripts requeue on it, and `--train.resume auto` continues from the last checkpoint.
LOST_PEER_EXIT_CODE = 76
# What gloo and NCCL say when a peer dies or hangs in a collective (closed socket, timeout, abort).
_LOST_PEER = re.compile(r"connection (closed|reset)|closed by peer|broken pipe|timed? ?out|timeout|"
                        r"NCCL (error|communicator was aborted)|DistBackendError|socket|ECONNRESET|EPIPE",
                        re.IGNORECASE)


_timeout_s = 300.0  # init_distributed's, for the message


def lost_peer(err: BaseException) -> Optional[str]:
    """The sentence for an error that means a peer rank is gone (None for any other error)."""
    text = f"{type(err).__name__}: {err}"
    if not dist.is_initialized() or not _LOST_PEER.search(text):
        return None
    first_line = text.strip().splitlines()[0][:300]
    return (f"lost contact with another rank during a collective ({first_line}). The likely cause: a rank exited "
            f"or was killed, or its node failed or hung (collectives wait at most train.collective_timeout_s="
            f"{_timeout_s:g}). Exit code {LOST_PEER_EXIT_CODE}: requeue or rerun; --train.resume auto continues from "
            "the last checkpoint")


# ---- starting the process group -------------------------------------------------------------

_TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How MPI launchers tell a process the size of its job and of its node (MPICH/Intel MPI Hydra and
# Slurm's PMI2, Open MPI, MVAPICH).
_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_LOCAL_SIZE = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


class LaunchError(ConfigError):
    """The launch environment cannot start a process group; the message names the variables."""


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick; released again for the caller to bind)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _slurm_tasks_on_this_node() -> Optional[int]:
    """Tasks of this srun step on this node, from SLURM_STEP_TASKS_PER_NODE (`2(x3),1`) and SLURM_NODEID."""
    spec, node = os.environ.get("SLURM_STEP_TASKS_PER_NODE"), os.environ.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    return counts[int(node)] if int(node) < len(counts) else None


def _env_from_slurm() -> bool:
    """A task started by srun gets its rank from SLURM_*; MASTER_ADDR/PORT come from the batch script.

    Only inside a job step (SLURM_STEP_ID): the batch script itself also has SLURM_PROCID=0.
    """
    if "RANK" in os.environ or "SLURM_STEP_ID" not in os.environ or "SLURM_PROCID" not in os.environ:
        return False
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return False  # left to MPI discovery under `srun --mpi=pmi2`, or refused below
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    local = _slurm_tasks_on_this_node()
    if local:
        os.environ["LOCAL_WORLD_SIZE"] = str(local)
    return True


def _mpi_world_size() -> int:
    for name in _MPI_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _mpi_master_port() -> int:
    """Rank 0 picks a free port on its host and every rank gets it through MPI.

    DeepSpeed's MPI discovery would use its fixed default port (29500), so two mpirun jobs on one
    host would collide on it; the job id is no help either, as mpirun has none.
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return world.bcast(free_port() if world.Get_rank() == 0 else None, root=0)


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int]:
    """Start the default process group under whatever launched this process; returns (rank, world size).

    - the deepspeed launcher (one node, `--hostfile` over pdsh/ssh, `--no_ssh --node_rank`), torchrun,
      or anything else that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: used as is;
    - srun (launch/slurm/*.sbatch): ranks from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID,
      MASTER_ADDR / MASTER_PORT exported by the batch script;
    - mpirun / mpiexec / `srun --mpi=pmi2`: DeepSpeed's MPI discovery (mpi4py), on a port rank 0 chose;
    - plain `python launch/train.py`: a group of one, on a free port.

    Every collective of the group, DeepSpeed's included, gives up after `timeout_s` seconds, so a
    lost or hung peer ends this rank instead of holding it for DeepSpeed's default of 30 minutes.
    """
    from datetime import timedelta

    import deepspeed
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    _env_from_slurm()
    port = TORCH_DISTRIBUTED_DEFAULT_PORT
    if not all(name in os.environ for name in _TORCH_ENV):
        if _mpi_world_size() > 1:
            port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else _mpi_master_port()
            for name in _MPI_LOCAL_SIZE:
                if name in os.environ:
                    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ[name])
                    break
        elif "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
            raise LaunchError("srun started this task without MASTER_ADDR and MASTER_PORT: submit it with "
                              "launch/slurm/*.sbatch, export both (the first node's address and a free port), "
                              "or use `srun --mpi=pmi2`")
        else:
            # No launcher: one process. Without MPI it needs no mpi4py; a free port lets several run at once.
            for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                                ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
                os.environ.setdefault(name, value)
    global _timeout_s
    _timeout_s = timeout_s
    deepspeed.init_distributed(distributed_port=port, timeout=timedelta(seconds=timeout_s))
    atexit.register(_remove_shm_buffer, dist.get_rank())
    return world()


def exit_without_teardown(code: int) -> None:
    """Leave now with `code`, after flushing the logs and removing our shm buffer, skipping the process
    group's teardown and DeepSpeed's exit work: once a checkpoint is complete (or a peer is gone) they
    only wait on peers that may have left, and under SLURM a rank still tearing down when KillWait
    ends is killed, and its exit code with it (seen: 12 s after the checkpoint of a plain scancel)."""
    import logging
    import sys

    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        _remove_shm_buffer(dist.get_rank())
    os._exit(code)


def _remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce creates a 69 MB buffer per rank in /dev/shm, named after the
    master address and port, and never removes it: a machine that runs many jobs fills its RAM-backed
    /dev/shm. By exit every peer has mapped it long ago (at initialisation), so unlinking is safe."""
    from pipeline.engine.ds_adapter import shm_buffer_path

    with contextlib.suppress(OSError):
        os.unlink(shm_buffer_path(rank))
