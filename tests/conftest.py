"""Shared fixtures: small datasets written on the fly, and an in-process CLI runner."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from inrseg.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run ``inrseg ARGS`` in-process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def write_nnunet(root: Path, n: int = 4, shape=(24, 20), channels: int = 1, seed: int = 0,
                 labels=None) -> Path:
    """A tiny nnU-Net raw dataset with random blobs: ``n`` cases in ``imagesTr`` / ``labelsTr``."""
    from inrseg.data.io import Volume, save_image, save_labels

    rng = np.random.default_rng(seed)
    names = labels or {"background": 0, "a": 1, "b": 2}
    affine = np.diag([1.5, 1.5, 1.5, 1.0]) if len(shape) == 3 else np.diag([1.5, 1.5, 1.0, 1.0])
    for i in range(n):
        lab = rng.integers(0, len(names), size=shape).astype(np.uint8)
        like = Volume(lab, affine, len(shape))
        for c in range(channels):
            save_image(rng.normal(size=shape).astype(np.float32), root / "imagesTr" / f"sub{i:02d}_s0_{c:04d}.nii.gz",
                       like=like)
        save_labels(lab, root / "labelsTr" / f"sub{i:02d}_s0.nii.gz", like=like)
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "channel_names": {str(c): f"ch{c}" for c in range(channels)},
        "labels": names, "file_ending": ".nii.gz", "numTraining": n}))
    return root
