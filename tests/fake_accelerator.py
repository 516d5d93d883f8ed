"""A second device on a CPU-only machine, and a process group that refuses tensors not on it.

NCCL only takes accelerator tensors; gloo takes CPU tensors, so CPU tests cannot see a tensor on the
wrong side of a collective. Here the "accelerator" is the `meta` device: `tensor.to("meta")` gives an
`OnAccelerator` tensor that still holds its values (in a CPU tensor inside), reports `device ==
meta`, and, like a CUDA tensor, refuses to be combined with a CPU tensor of one or more dimensions.
`strict_collectives` makes a 1-process group communicate only such tensors, as NCCL would.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")


class OnAccelerator(torch.Tensor):
    """A tensor on the fake accelerator: a CPU tensor inside, `meta` to the outside world."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=DEVICE,
                                                   strides=inner.stride(), requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def tolist(self):  # a CUDA tensor allows it (with a sync); the wrapper subclass would not
        return self.inner.tolist()

    def __repr__(self) -> str:
        return f"OnAccelerator({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        host_tensors = []

        def unwrap(x):
            if isinstance(x, OnAccelerator):
                return x.inner
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                host_tensors.append(x)
            return x

        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if func is torch.ops.aten._to_copy.default:
            target = kwargs.pop("device", None)
            if target is not None and torch.device(target).type == "cpu":
                return func(*args, **kwargs)
            return OnAccelerator(func(*args, **kwargs))
        if host_tensors:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found a cpu tensor and a "
                               f"{DEVICE} tensor ({func})")
        out = func(*args, **kwargs)
        return tree_map(lambda x: OnAccelerator(x) if isinstance(x, torch.Tensor) else x, out)


class _MoveToAccelerator(TorchDispatchMode):
    """Turns `cpu_tensor.to(meta)` and factories with `device=meta` into OnAccelerator tensors, instead of
    data-less meta tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("device")
        if target is not None and torch.device(target) == DEVICE and not any(
                isinstance(a, OnAccelerator) for a in args):
            out = func(*args, **dict(kwargs, device=torch.device("cpu")))
            return tree_map(lambda x: OnAccelerator(x) if isinstance(x, torch.Tensor) else x, out)
        return func(*args, **kwargs)


def _refuse_off_device(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device != DEVICE:
            raise RuntimeError(f"{name}: No backend type associated with device type {t.device.type} "
                               f"(this process group communicates on {DEVICE})")


def _all_reduce(tensor, op=None, group=None, async_op=False):
    _refuse_off_device("all_reduce", tensor)  # one rank: the reduction is the tensor itself


def _all_gather(tensor_list, tensor, group=None, async_op=False):
    _refuse_off_device("all_gather", tensor, *tensor_list)
    tensor_list[0].copy_(tensor)


def _broadcast(tensor, src=0, group=None, async_op=False):
    _refuse_off_device("broadcast", tensor)


@contextlib.contextmanager
def strict_collectives(monkeypatch, tmp_path):
    """A real 1-process group whose backend reports NCCL-like accelerator communication on `meta`."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_store'}", rank=0, world_size=1)
    try:
        from deepspeed.accelerator import get_accelerator

        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(type(get_accelerator()), "current_device_name", lambda self: str(DEVICE))
        monkeypatch.setattr(dist, "all_reduce", _all_reduce)
        monkeypatch.setattr(dist, "all_gather", _all_gather)
        monkeypatch.setattr(dist, "broadcast", _broadcast)
        with _MoveToAccelerator():
            yield DEVICE
    finally:
        dist.destroy_process_group()
