"""nnU-Net's folders for one fit: the raw dataset written from inrseg's cases, planning,
preprocessing, the CPU plan and the split; and the axis order nnU-Net works in.

nnU-Net reads its folders from the environment variables ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` at the moment it uses them (nnunetv2 2.8); a fit
points them at a fresh temporary folder (:func:`nnunet_environment`) and restores them after,
so that several fits in one process never share a folder.

Axis order: inrseg's :class:`~inrseg.data.volume.Volume` holds ``(C, X, Y, Z)`` in the file's
voxel order (a 2D slice ``(C, H, W)``, stored as ``H x W x 1``); nnU-Net's ``NibabelIO``, which
the raw dataset names as its reader, hands nnU-Net ``(C, Z, Y, X)`` with the spacing reversed.
:func:`to_nnunet` and :func:`from_nnunet` convert, so training (files) and prediction (arrays)
see the same orientation.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from inrseg.core.environ import environment
from inrseg.data.cases import Case
from inrseg.data.nifti import save_image, save_labels
from inrseg.data.volume import IGNORE, Volume, label_array

__all__ = ["DATASET_ID", "DATASET_NAME", "cpu_plan", "from_nnunet", "nnunet_environment", "plan_and_preprocess",
           "to_nnunet", "write_raw_dataset", "write_split"]

DATASET_ID = 1
DATASET_NAME = "Dataset001_inrseg"
_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA")


@contextlib.contextmanager
def nnunet_environment(data_workers: int) -> Iterator[Path]:
    """A temporary nnU-Net base folder (``raw``, ``preprocessed``, ``results``) named by the
    environment while the block runs (and ``nnUNet_n_proc_DA``, its augmentation processes);
    the variables are restored and the folder removed after, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="inrseg-nnunet-") as tmp:
        base = Path(tmp)
        folders = {key: base / sub for key, sub in zip(_ENV[:3], ("raw", "preprocessed", "results"))}
        for folder in folders.values():
            folder.mkdir()
        with environment({**{k: str(v) for k, v in folders.items()}, "nnUNet_n_proc_DA": str(int(data_workers))}):
            yield base


def case_key(i: int) -> str:
    """nnU-Net's identifier of inrseg case number ``i`` (plain, so any case id is safe)."""
    return f"case{i:05d}"


def write_raw_dataset(base: Path, cases: Sequence[Case], label_names: Sequence[str], in_channels: int,
                      channel_kinds: Sequence[str] = ()) -> dict[str, str]:
    """Write ``cases`` as nnU-Net raw data (``imagesTr/caseNNNNN_XXXX.nii.gz``, ``labelsTr``,
    ``dataset.json`` naming ``NibabelIO``) from what inrseg reads (any layout and format it
    reads); unlabelled voxels become nnU-Net's ignore label (the value after the last class).
    Returns ``{nnU-Net key: case_id}``."""
    root = base / "raw" / DATASET_NAME
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    keys, has_ignore = {}, False
    for i, case in enumerate(cases):
        key = case_key(i)
        image, labels = case.load()
        affine = nnunet_affine(image)
        for c in range(image.data.shape[0]):
            save_image(image.with_data(image.data[c:c + 1], affine), root / "imagesTr" / f"{key}_{c:04d}.nii.gz")
        lab = label_array(labels)
        if (lab == IGNORE).any():
            has_ignore = True
            lab = np.where(lab == IGNORE, len(label_names), lab)
        save_labels(lab, root / "labelsTr" / f"{key}.nii.gz", labels.with_data(labels.data, affine))
        keys[key] = case.case_id
    kinds = list(channel_kinds) or ["zscore"] * in_channels
    if len(kinds) != in_channels:
        raise ValueError(f"channel_kinds names {len(kinds)} channels, the data has {in_channels}")
    label_map = {("background" if v == 0 else f"{v}_{name}"): v for v, name in enumerate(label_names)}
    if has_ignore:
        label_map["ignore"] = len(label_names)
    meta = {"channel_names": {str(c): k for c, k in enumerate(kinds)}, "labels": label_map,
            "numTraining": len(cases), "file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIO"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return keys


def _quiet() -> contextlib.ExitStack:
    """nnU-Net prints as it goes: into a buffer (the fit's log gets what matters)."""
    stack = contextlib.ExitStack()
    buf = io.StringIO()
    stack.enter_context(contextlib.redirect_stdout(buf))
    stack.enter_context(contextlib.redirect_stderr(buf))
    return stack


def plan_and_preprocess(configuration: str) -> tuple[dict, dict]:
    """nnU-Net's fingerprint, experiment planning (its default planner) and preprocessing of
    ``configuration`` on the raw dataset, one process; returns ``(plans, dataset_json)``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    import torch
    threads, workers = torch.get_num_threads(), os.environ.get("nnUNet_n_proc_DA")
    # the planner sets torch's threads to nnUNet_n_proc_DA (which must be >= 1 there): keep ours
    os.environ["nnUNet_n_proc_DA"] = str(threads)
    try:
        with _quiet():
            extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False,
                                 show_progress_bar=False)
            plan_experiments([DATASET_ID])
            preprocess([DATASET_ID], configurations=(configuration,), num_processes=(1,), verbose=False,
                       show_progress_bar=False)
    finally:
        torch.set_num_threads(threads)
        if workers is not None:
            os.environ["nnUNet_n_proc_DA"] = workers
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((pre / "dataset.json").read_text(encoding="utf-8"))
    return plans, dataset_json


def cpu_plan(plans: dict, configuration: str, batch_size: int, width_divisor: int) -> tuple[dict, str]:
    """A configuration ``<configuration>_cpu`` added to nnU-Net's ``plans``, inheriting from
    ``configuration`` (same preprocessed data, patch and topology) with ``batch_size`` and every
    stage's features divided by ``width_divisor`` (at least 8). Returns ``(plans, name)``."""
    base = plans["configurations"][configuration]
    arch = json.loads(json.dumps(base["architecture"]))
    feats = arch["arch_kwargs"]["features_per_stage"]
    arch["arch_kwargs"]["features_per_stage"] = [max(8, int(f) // int(width_divisor)) for f in feats]
    name = f"{configuration}_cpu"
    plans = json.loads(json.dumps(plans))
    plans["configurations"][name] = {"inherits_from": configuration, "batch_size": int(batch_size),
                                     "architecture": arch}
    return plans, name


def write_split(keys_train: Sequence[str], keys_val: Sequence[str]) -> None:
    """nnU-Net's ``splits_final.json``: fold 0 is inrseg's split (train / validation by subject)."""
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    (pre / "splits_final.json").write_text(json.dumps([{"train": list(keys_train), "val": list(keys_val)}]),
                                           encoding="utf-8")


#: the spacing nnU-Net gives the singleton axis of a 2D image (its own 2D readers use 999): it
#: must be the coarsest axis, so that the 2d configuration slices along it
SLICE_SPACING_2D = 999.0


def nnunet_affine(image: Volume) -> np.ndarray:
    """The affine of ``image`` as nnU-Net gets it: a 2D slice's third axis stretched to
    :data:`SLICE_SPACING_2D` mm (3D: unchanged)."""
    affine = image.affine.copy()
    if image.spatial_ndim == 2:
        col = affine[:3, 2]
        n = float(np.linalg.norm(col))
        affine[:3, 2] = (col / n if n > 0 else np.array([0.0, 0.0, 1.0])) * SLICE_SPACING_2D
    return affine


def _spacing3(image: Volume) -> list[float]:
    """The three voxel sizes nnU-Net sees (:func:`nnunet_affine`)."""
    sp = np.linalg.norm(nnunet_affine(image)[:3, :3], axis=0)
    return [float(s) if s > 0 else 1.0 for s in sp]


def to_nnunet(image: Volume) -> tuple[np.ndarray, dict]:
    """``image`` ``(C, *S)`` as nnU-Net's ``NibabelIO`` reads its file: ``(C, Z, Y, X)``
    float32 and ``{"spacing": [sz, sy, sx]}``."""
    data = image.data.astype(np.float32)
    if image.spatial_ndim == 2:
        data = data[..., None]
    if data.ndim != 4:
        raise ValueError(f"nnU-Net takes 2D or 3D images, got a {image.spatial_ndim}D grid")
    return np.ascontiguousarray(data.transpose(0, 3, 2, 1)), {"spacing": _spacing3(image)[::-1]}


def from_nnunet(array: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """nnU-Net's ``(K, Z, Y, X)`` output back onto inrseg's grid ``(K, *S)``."""
    out = np.asarray(array).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(out[..., 0] if spatial_ndim == 2 else out)
