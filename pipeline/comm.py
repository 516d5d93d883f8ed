"""Every collective of the pipeline goes through here.

NCCL only communicates tensors on the accelerator and gloo only CPU tensors; a tensor on the wrong
side fails at run time (`No backend type associated with device type cpu`), and tests on gloo alone
never see it. So each function below moves its input to the process group's device (`device()`),
communicates, and hands the result back on the device the caller names (by default the input's).
Without an initialised process group every function acts as a group of one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

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


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one: for decisions every rank must share."""
    return bool(all_reduce(torch.tensor([float(flag)]), op="max").item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
