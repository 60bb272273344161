"""torch.distributed plumbing for torchrun: ranks, the process group, collectives, DDP.

The environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) is checked before anything uses it (:func:`distributed_env`): a garbage value or
a missing variable is one line naming it. Joining the process group waits at most
``INRSEG_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_JOIN_TIMEOUT_S`) for the other ranks, so
a leftover ``WORLD_SIZE=2`` without a second rank fails within that time instead of hanging;
collectives after that wait up to :data:`COLLECTIVE_TIMEOUT` (rank 0 validates while the others
wait).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from inrseg.core.errors import InputError

#: seconds a rank waits for the others to join the process group (``INRSEG_DIST_TIMEOUT``)
DEFAULT_JOIN_TIMEOUT_S = 120.0
#: how long a collective waits once the group has formed: rank 0 may validate for a long time
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
_HINT = ("torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; unset WORLD_SIZE "
         "to run one process")


@dataclass(frozen=True)
class DistEnv:
    """The process group torchrun describes: this process's ``rank`` and ``local_rank`` among
    ``world_size`` ranks, and the rendezvous address ``master_addr:master_port``."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _env_int(name: str) -> int | None:
    """The integer in environment variable ``name`` (``None``: unset or empty)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(None, f"{name}={os.environ[name]!r:.40}: expected a whole number ({_HINT})") from None


def distributed_env() -> DistEnv | None:
    """The checked torchrun environment, or ``None`` for one process (``WORLD_SIZE`` unset or 1).

    Raises:
        InputError: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` or ``MASTER_PORT`` not a whole number,
            ``WORLD_SIZE`` < 1, ``RANK`` / ``LOCAL_RANK`` outside ``0..WORLD_SIZE-1``, and with
            ``WORLD_SIZE`` > 1: ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT`` (1..65535) missing.
    """
    size = _env_int("WORLD_SIZE")
    size = 1 if size is None else size
    if size < 1:
        raise InputError(None, f"WORLD_SIZE={size}: expected 1 or more ranks ({_HINT})")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name, value in (("RANK", rank), ("LOCAL_RANK", local)):
        if value is not None and not 0 <= value < size:
            raise InputError(None, f"{name}={value} is outside 0..{size - 1} (WORLD_SIZE={size}; {_HINT})")
    if size == 1:
        return None
    addr, port = os.environ.get("MASTER_ADDR", "").strip(), _env_int("MASTER_PORT")
    for name, missing in (("RANK", rank is None), ("MASTER_ADDR", not addr), ("MASTER_PORT", port is None)):
        if missing:
            raise InputError(None, f"WORLD_SIZE={size} but {name} is not set ({_HINT})")
    if not 0 < port < 2 ** 16:
        raise InputError(None, f"MASTER_PORT={port}: expected a port in 1..65535 ({_HINT})")
    return DistEnv(rank, size, 0 if local is None else local, addr, port)


def join_timeout_s() -> float:
    """Seconds to wait for every rank at the rendezvous: ``INRSEG_DIST_TIMEOUT`` or
    :data:`DEFAULT_JOIN_TIMEOUT_S`. Raises :class:`InputError` for a value that is no positive
    number of seconds."""
    text = os.environ.get("INRSEG_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_JOIN_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(None, f"INRSEG_DIST_TIMEOUT={text!r:.40}: expected a positive number of seconds")
    return value


def is_distributed_env() -> bool:
    """Whether this process was launched by torchrun (or another launcher) with > 1 ranks
    (the environment checked by :func:`distributed_env`)."""
    return distributed_env() is not None


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, checked; 0 for one process)."""
    env = distributed_env()
    return 0 if env is None else env.local_rank


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes files and prints progress."""
    return world()[0] == 0


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[list[bytes]]:
    """Hold what native code writes to file descriptor 2 during the block (c10d logs every
    failed connection attempt with a C++ stack): the list it yields receives it at the end, for
    the caller to print or drop. Without a usable descriptor 2 the block runs as it is."""
    held: list[bytes] = []
    try:
        saved = os.dup(2)
    except OSError:
        yield held
        return
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held.append(tmp.read())


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (:func:`distributed_env`).

    NCCL for CUDA devices, gloo otherwise. A no-op (returns ``False``) for a single process or
    when the group exists already. The rendezvous waits at most :func:`join_timeout_s` for the
    other ranks; once joined, collectives wait up to :data:`COLLECTIVE_TIMEOUT` (rank 0
    validates while the others wait).

    Raises:
        InputError: a garbage or incomplete environment, or ranks that did not all join in time
            (one line naming the address, the timeout and what torch reported).
    """
    env = distributed_env()
    if env is None or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    wait = join_timeout_s()
    # the timeout given to init_process_group bounds the rendezvous and is the group's default;
    # torch's setter raises the default afterwards (without it, the long timeout throughout)
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with _native_stderr_held() as held:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=wait) if set_timeout
                                    else COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError, TimeoutError, OSError) as exc:  # c10d's retries are dropped
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise InputError(None, f"rank {env.rank} of WORLD_SIZE={env.world_size} could not form the process group at "
                               f"MASTER_ADDR:MASTER_PORT {env.master_addr}:{env.master_port} within {wait:g} s "
                               f"(INRSEG_DIST_TIMEOUT): {first[:160]}; are all ranks started? ({_HINT})") from None
    if held and held[0]:  # joined: what c10d had to say (warnings) goes out as it would have
        sys.stderr.write(held[0].decode("utf-8", "replace"))
    if set_timeout is not None:
        set_timeout(COLLECTIVE_TIMEOUT)
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
