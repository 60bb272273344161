"""Writing phantom datasets to disk, in the nnU-Net raw or the UK Biobank layout."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inrseg.core.errors import InputError
from inrseg.core.files import atomic_dir
from inrseg.core.progress import progress
from inrseg.data.nifti import save_image, save_labels
from inrseg.data.phantoms.brain import BRAIN_LABELS, brain_phantom, brain_spacing
from inrseg.data.phantoms.cardiac import CARDIAC_LABELS, cardiac_phantom
from inrseg.data.volume import Volume

__all__ = ["MIN_CARDIAC_SLICES", "MIN_PHANTOM_EDGE", "PHANTOM_SHAPES", "check_phantom_shape", "phantom_spacing",
           "subject_seed", "write_phantom_dataset"]

#: default grid shape per phantom kind (brain2d/3d: the benchmark data's shapes)
PHANTOM_SHAPES: dict[str, tuple[int, ...]] = {
    "brain2d": (160, 192),
    "brain3d": (80, 96, 112),
    "cardiac": (96, 96, 10),
}
_CARDIAC_SPACING = (1.8, 1.8, 8.0)  # mm at the default cardiac shape
#: the smallest edge (voxels) of a phantom image: the smallest that every method takes with its
#: default settings (the default U-Net and MORSE networks down-sample by 16, and their instance
#: norm needs more than one voxel at the coarsest level: an edge of 17 pads to 32, 2 voxels there)
MIN_PHANTOM_EDGE = 17
#: the fewest slices of a cardiac phantom (one slice would make each frame a 2D image)
MIN_CARDIAC_SLICES = 2


def phantom_spacing(kind: str, shape: Sequence[int]) -> tuple[float, ...]:
    """Voxel spacing (mm) used for ``kind`` at grid ``shape``: the field of view stays the same
    at any size (a 2x larger grid samples the same anatomy twice as finely). Cardiac grids of
    the default shape (96, 96, 10) get 1.8 x 1.8 x 8 mm voxels."""
    if kind == "cardiac":
        return tuple(s * d / n for s, d, n in zip(_CARDIAC_SPACING, PHANTOM_SHAPES["cardiac"], shape))
    return brain_spacing(shape)


def check_phantom_shape(kind: str, shape: Sequence[int], layout: str = "nnunet") -> None:
    """Refuse (:class:`InputError`) a phantom grid ``shape`` that some method could not take:
    2D / 3D images (brain phantoms, and cardiac frames in the nnU-Net layout) need every edge of at
    least :data:`MIN_PHANTOM_EDGE` (a cardiac slice axis: :data:`MIN_CARDIAC_SLICES`); 3D + t
    cines (the UK Biobank layout, segmented by NISF, which takes any size) need
    :data:`MIN_CARDIAC_SLICES` slices."""
    edge = MIN_PHANTOM_EDGE if layout == "nnunet" else 1
    mins = [edge] * len(shape)
    if kind == "cardiac":
        mins[-1] = MIN_CARDIAC_SLICES
    text = ",".join(str(v) for v in shape)
    for axis, (n, least) in enumerate(zip(shape, mins)):
        if n < least:
            what = (f"{least} slices (its last axis)" if kind == "cardiac" and axis == len(shape) - 1 else
                    f"{least} voxels along every in-plane axis" if kind == "cardiac" else
                    f"{least} voxels along every axis")
            why = " (the default U-Net and MORSE down-sample by 16)" if least == MIN_PHANTOM_EDGE else ""
            raise InputError(None, f"phantom shape {text} is too small: a {kind} phantom needs at least {what}, "
                                   f"the smallest every method takes{why}")


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of a dataset made with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_phantom_dataset(kind: str, out: str | Path, n_train: int, n_test: int = 0, seed: int = 0,
                          layout: str = "nnunet", shape: Sequence[int] | None = None,
                          frames: int = 12) -> Path:
    """Write ``n_train`` training and ``n_test`` test phantom subjects to ``out``.

    Layouts:
        ``"nnunet"``: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``
            (+ ``imagesTs`` / ``labelsTs``). Brain cases are ``phantomNNN`` (one case per
            subject); cardiac cases are one 3D volume per frame, ``heartNNN_tTT``, so the subject
            rule (case id up to the first underscore) groups a subject's frames.
        ``"ukbb"`` (cardiac only): ``train/heartNNN/{sa,seg_sa}.nii.gz`` 4D (X, Y, Z, T), and
            ``test/...`` when ``n_test > 0``; without test subjects the subject folders sit
            directly in ``out``.

    The dataset is assembled in a temporary sibling directory and renamed onto ``out`` at the
    end (:func:`inrseg.core.files.atomic_dir`), so an interrupted run leaves nothing
    half-written. An existing ``out`` is replaced. A shape with an edge below
    :data:`MIN_PHANTOM_EDGE` is refused (:func:`check_phantom_shape`) before anything is written.
    """
    if kind not in PHANTOM_SHAPES:
        raise ValueError(f"unknown phantom kind {kind!r} ({', '.join(PHANTOM_SHAPES)})")
    if layout == "ukbb" and kind != "cardiac":
        raise ValueError("the UK Biobank layout holds cardiac cine data only")
    default_shape = PHANTOM_SHAPES[kind]
    shape = tuple(shape) if shape is not None else default_shape
    if len(shape) != len(default_shape):
        raise InputError(None, f"phantom shape {','.join(map(str, shape))}: a {kind} phantom needs "
                               f"{len(default_shape)} axes")
    check_phantom_shape(kind, shape, layout)
    spacing = phantom_spacing(kind, shape)
    out = Path(out)
    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    with atomic_dir(out, force=True) as tmp:
        names = CARDIAC_LABELS if kind == "cardiac" else BRAIN_LABELS
        for index in progress(range(n_train + n_test), desc=f"writing {kind} phantoms"):
            split = "Tr" if index < n_train else "Ts"
            s = subject_seed(seed, index)
            if kind == "cardiac":
                image, labels = cardiac_phantom(shape, frames, s, spacing)
                case = f"heart{index:03d}"
                if layout == "ukbb":
                    folder = tmp / (("train" if split == "Tr" else "test") if n_test else "") / case
                    like = Volume(labels, affine, 4, time_step=1.0 / frames)
                    save_image(image, folder / "sa.nii.gz", like=like)
                    save_labels(labels, folder / "seg_sa.nii.gz", like=like)
                    continue
                for t in range(frames):
                    like = Volume(labels[..., t], affine, 3)
                    save_image(image[..., t], tmp / f"images{split}" / f"{case}_t{t:02d}_0000.nii.gz", like=like)
                    save_labels(labels[..., t], tmp / f"labels{split}" / f"{case}_t{t:02d}.nii.gz", like=like)
            else:
                image, labels = brain_phantom(shape, s, spacing)
                case = f"phantom{index:03d}"
                like = Volume(labels, affine, len(shape))
                save_image(image, tmp / f"images{split}" / f"{case}_0000.nii.gz", like=like)
                save_labels(labels, tmp / f"labels{split}" / f"{case}.nii.gz", like=like)
        if layout == "nnunet":
            meta = {"name": f"phantom-{kind}", "channel_names": {"0": "cine" if kind == "cardiac" else "T1"},
                    "labels": dict(names), "file_ending": ".nii.gz",
                    "numTraining": n_train * (frames if kind == "cardiac" else 1),
                    "description": f"inrseg synthetic {kind} phantom, seed {seed}, shape {list(shape)}, "
                                   f"spacing {list(spacing)} mm"}
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out
