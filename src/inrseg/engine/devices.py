"""Devices and precision: ``--device`` values, bf16 autocast."""

from __future__ import annotations

import contextlib

import torch

from inrseg.core.errors import InputError
from inrseg.engine.distributed import distributed_env, join_timeout_s

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` for a ``--device`` value.

    ``"auto"`` (or ``None``) picks CUDA when present, else the CPU. ``"cuda"`` without an index
    means this process's GPU: ``cuda:LOCAL_RANK`` under torchrun, else the current one.

    Raises:
        InputError: unknown spelling, a device this machine does not have, or a garbage or
            incomplete torchrun environment (checked here, before a command reads any data).
    """
    env = distributed_env()
    if env is not None:
        join_timeout_s()
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(None, f"--device {spec!r}: expected {DEVICE_CHOICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {spec}: no CUDA device is available on this machine")
        index = dev.index if dev.index is not None else (
            env.local_rank if env is not None else torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise InputError(None, f"--device {spec}: this machine has {torch.cuda.device_count()} "
                                   f"CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(None, f"--device {spec}: MPS is not available on this machine")
        return dev
    if dev.type != "cpu":
        raise InputError(None, f"--device {spec!r}: expected {DEVICE_CHOICES}")
    return dev


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def use_bf16(device: torch.device, precision: str = "auto", method_allows: bool = True) -> bool:
    """Whether to train under bf16 autocast.

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"auto"`` - bf16 on a CUDA device that supports
    it, when the method allows it (INRs with sine / Gabor activations at w0 = 10-30 do not:
    bf16 keeps 8 bits of mantissa, so ``sin(30 x)`` loses its phase); fp32 on the CPU, where
    bf16 is rarely faster.
    """
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision != "auto":
        raise InputError(None, f"--precision {precision!r}: expected auto, fp32 or bf16")
    return bool(method_allows and device.type == "cuda" and torch.cuda.is_bf16_supported())

