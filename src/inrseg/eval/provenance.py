"""Provenance of a result: the commit it ran from, the machine, the library versions, the date."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_model", "git_state", "library_versions", "machine_line", "source_repo", "utc_now"]


def source_repo() -> Path:
    """The folder whose git state is recorded: the checkout the ``inrseg`` package runs from."""
    return Path(__file__).resolve().parents[1]


def git_state(repo: Path) -> dict:
    """``{"commit", "dirty", "changed"}`` of the git work tree holding ``repo``; commit ``None``
    outside a git checkout (a pip-installed package: its version stands for the code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo, timeout=30,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # porcelain lines are "XY path": the status letters may start with a space
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": []}
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the figures depend on."""
    out = {"python": platform.python_version()}
    for name in ("inrseg", "torch", "monai", "numpy", "scipy", "nibabel", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine_line(device: torch.device) -> str:
    """``"2 CPU cores (model), no GPU used"`` or with the CUDA device's name."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), {gpu}"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
