"""Provenance of a result: the commit it ran from, the machine, the library versions, the date."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["cpu_model", "git_state", "library_versions", "machine_line", "source_repo", "utc_now",
           "write_result_file"]


def source_repo() -> Path:
    """The folder whose git state is recorded: the checkout the ``inrseg`` package runs from."""
    return Path(__file__).resolve().parents[1]


def git_state(repo: Path) -> dict:
    """``{"commit", "dirty", "changed"}`` of the git work tree holding ``repo``; commit ``None``
    outside a git checkout (a pip-installed package: its version stands for the code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, encoding="utf-8", cwd=repo, timeout=30,
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
        with open("/proc/cpuinfo", encoding="utf-8") as f:
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


def write_result_file(folder: Path, name: str, notes: str, sections: dict[str, str]) -> Path:
    """``folder/<date>-<name>.md`` (``-2``, ``-3``... where that exists: a run never overwrites an
    earlier one): a header with the date, commit, machine, torch threads and command, then
    ``notes``, then one ``## title`` section per entry of ``sections``. Returns the path."""
    now = utc_now()
    folder.mkdir(parents=True, exist_ok=True)
    path, k = folder / f"{now:%Y-%m-%d}-{name}.md", 1
    while path.exists():
        k += 1
        path = folder / f"{now:%Y-%m-%d}-{name}-{k}.md"
    git = git_state(source_repo())
    body = [f"# {name}", "", f"- date: {now:%Y-%m-%d %H:%M} UTC",
            f"- commit: {git['commit']}{' (dirty)' if git['dirty'] else ''}",
            f"- machine: {machine_line(torch.device('cpu'))}, {torch.get_num_threads()} torch threads",
            f"- command: `{' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`", "", notes, ""]
    for title, text in sections.items():
        body += [f"## {title}", "", text, ""]
    path.write_text("\n".join(body), encoding="utf-8")
    return path
