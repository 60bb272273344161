"""Shared fixtures: small datasets written on the fly, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from inrseg.cli import main

# The tests use tiny tensors: one thread is faster than two and immune to a busy neighbour.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("INRSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
    from inrseg.data.nifti import save_image, save_labels
    from inrseg.data.volume import Volume

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


def write_blobs(root: Path, n: int = 6, shape=(32, 32), seed: int = 0, spacing=1.0) -> Path:
    """A learnable nnU-Net dataset: noisy images of a bright disk/ball (class 1) and a darker
    ring/shell around it (class 2). Cases ``subNN_x``, one subject each."""
    from inrseg.data.nifti import save_image, save_labels
    from inrseg.data.volume import Volume

    rng = np.random.default_rng(seed)
    d = len(shape)
    affine = np.diag([spacing] * 3 + [1.0])
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n):
        centre = [rng.uniform(0.35, 0.65) * s for s in shape]
        r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        r0 = rng.uniform(0.15, 0.25) * min(shape)
        lab = np.where(r < r0, 1, np.where(r < 1.5 * r0, 2, 0)).astype(np.uint8)
        img = np.choose(lab, [0.1, 0.9, 0.5]).astype(np.float32) + rng.normal(0, 0.05, shape).astype(np.float32)
        like = Volume(lab, affine, d)
        save_image(img, root / "imagesTr" / f"sub{i:02d}_x_0000.nii.gz", like=like)
        save_labels(lab, root / "labelsTr" / f"sub{i:02d}_x.nii.gz", like=like)
    (root / "dataset.json").write_text(json.dumps({
        "name": "blobs", "channel_names": {"0": "img"}, "labels": {"background": 0, "core": 1, "rim": 2},
        "file_ending": ".nii.gz", "numTraining": n}))
    return root


def write_brain2d(root: Path, n: int = 6, n_test: int = 3, shape: str = "40,48") -> Path:
    """A brain2d phantom dataset (``inrseg data phantom``) with ``n`` training and ``n_test``
    test subjects at ``shape``."""
    assert main(["-q", "data", "phantom", "--kind", "brain2d", "--n", str(n), "--n-test", str(n_test), "--shape",
                 shape, "--out", str(root)]) == 0
    return root
