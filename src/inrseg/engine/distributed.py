"""torch.distributed plumbing for torchrun: ranks, the process group, collectives, DDP."""

from __future__ import annotations

import datetime
import gc
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

def is_distributed_env() -> bool:
    """Whether this process was launched by torchrun (or another launcher) with > 1 ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes files and prints progress."""
    return world()[0] == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    NCCL for CUDA devices, gloo otherwise. A no-op (returns ``False``) for a single process or
    when the group exists already. The timeout is generous: rank 0 validates while the others
    wait.
    """
    if not is_distributed_env() or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return True




def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def leave_distributed(clean: bool = True) -> None:
    """Leave the process group, if this process is in one.

    ``clean`` (the command ended normally): wait for every rank first and let garbage (DDP
    reducers, finished gloo work holding tensors) go before the group does. Without the
    barrier, a rank that leaves while another still writes its files tore gloo down under
    live work now and then (``terminate called without an active exception``, SIGABRT on a
    2-core CI machine). After an error there is no barrier: the other ranks may never come.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
        gc.collect()
    dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable Python objects: metrics, flags)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks, in place (one flat bucket, one collective)."""
    _, n = world()
    tensors = [t for t in tensors if t is not None]
    if n == 1 or not tensors:
        return
    dev = tensors[0].device
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device(dev))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(dev) / n
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if world()[1] > 1:
        buf = tensor.to(_comm_device(tensor.device))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        tensor.copy_(buf.to(tensor.device))
    return tensor


def shard(items: Sequence, rank: int | None = None, size: int | None = None) -> list:
    """This rank's share ``items[rank::size]`` (round-robin, so shares differ by at most one)."""
    r, n = world()
    r = r if rank is None else rank
    n = n if size is None else size
    return list(items[r::n])

def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` under DistributedDataParallel when running with > 1 ranks, else ``module``.

    Train through the returned module; save and validate with ``module`` itself.
    """
    if world()[1] == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                               find_unused_parameters=find_unused_parameters)
