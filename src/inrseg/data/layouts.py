"""Dataset layouts: nnU-Net raw, neurite-OASIS and UK Biobank cine; the inputs of ``segment``.

A reader returns a :class:`~inrseg.data.cases.Dataset` (paths only; nothing is read until
asked). Three layouts are understood:

* **nnU-Net raw** (the layout of ``shared/data``)::

      dataset.json                      {"channel_names": {"0": "T1"}, "labels": {"background": 0, ...}}
      imagesTr/CASE_0000.nii.gz         one file per channel (suffix _XXXX)
      labelsTr/CASE.nii.gz
      imagesTs/ labelsTs/               optional test split

* **neurite-OASIS**: one folder per subject with ``slice_norm``, ``slice_seg4``,
  ``slice_seg24`` (2D) and ``aligned_norm``, ``aligned_seg4``, ``aligned_seg35`` (3D) NIfTI
  files; pick the task with ``task=("2d"|"3d", "seg4"|"seg24"|"seg35")``.
* **UK Biobank cine** (Bai et al.): one folder per subject with ``sa.nii.gz`` and
  ``seg_sa.nii.gz``, 4D (X x Y x Z x T, time last); labels 0 background, 1 LV blood pool,
  2 LV myocardium, 3 RV blood pool. The subject folders sit in the dataset directory, or in its
  ``train/`` and ``test/`` folders. A ``dataset.json`` in the directory (or in its parent, for
  ``DIR/train``) may give the ``labels`` and the ``ignore`` value.

Every reader takes an optional splits JSON (:mod:`inrseg.data.splits`): its ``"subjects"`` map
and ``"test"`` subjects.

Ignore label
------------
Voxels without a label (e.g. the unannotated slices and frames of a sparsely labelled cine)
carry an *ignore* value, declared in ``dataset.json`` either at the top level,
``"ignore": 255``, or, as nnU-Net v2 does, as a label named ``"ignore"`` in ``"labels"``
(``{"background": 0, "lv": 1, "ignore": 2}``; it is not a class). Cases carry it as
``Case.ignore_label``; label validation accepts it; no trainer takes a loss on such a voxel and
no metric counts it (:func:`inrseg.data.volume.label_array` maps it to ``IGNORE = -1`` for the
trainers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from inrseg.core.errors import InputError
from inrseg.data.cases import Case, Dataset
from inrseg.data.entries import files_by_case, require_regular_file
from inrseg.data.nifti import IMAGE_SUFFIXES, NIFTI_SUFFIXES, grid_shape_of, is_nifti, strip_image_suffix
from inrseg.data.sitk_io import is_dicom_folder
from inrseg.data.schemas import IGNORE_KEY, ignore_label_from_json, label_names_from_json, read_dataset_json
from inrseg.data.splits import apply_test_split, assign_subjects, subject_map

__all__ = ["CARDIAC_LABEL_NAMES", "IGNORE_KEY", "OASIS_SEG24", "OASIS_SEG35", "OASIS_SEG4", "UKBB_IMAGE",
           "UKBB_LABELS", "case_id_of", "detect_layout", "find_nifti", "ignore_label_from_json",
           "image_files", "label_names_from_json", "load_nnunet", "load_oasis", "load_ukbb", "nifti_files",
           "open_dataset", "ukbb_subject_dirs"]

CARDIAC_LABEL_NAMES = ["background", "lv-blood-pool", "lv-myocardium", "rv-blood-pool"]
OASIS_SEG4 = ["background", "cortex", "subcortical-grey-matter", "white-matter", "csf"]
OASIS_SEG24 = [
    "background", "L-white-matter", "L-cortex", "L-lateral-ventricle", "L-inferior-lateral-ventricle",
    "L-thalamus", "L-caudate", "L-putamen", "L-pallidum", "3rd-ventricle", "brain-stem",
    "L-hippocampus", "L-ventral-DC", "L-choroid-plexus", "R-white-matter", "R-cortex",
    "R-lateral-ventricle", "R-inferior-lateral-ventricle", "R-thalamus", "R-caudate", "R-putamen",
    "R-pallidum", "R-hippocampus", "R-ventral-DC", "R-choroid-plexus",
]
OASIS_SEG35 = [
    "background", "L-cerebral-white-matter", "L-cerebral-cortex", "L-lateral-ventricle",
    "L-inf-lat-ventricle", "L-cerebellum-white-matter", "L-cerebellum-cortex", "L-thalamus",
    "L-caudate", "L-putamen", "L-pallidum", "3rd-ventricle", "4th-ventricle", "brain-stem",
    "L-hippocampus", "L-amygdala", "L-accumbens", "L-ventral-DC", "L-vessel", "L-choroid-plexus",
    "R-cerebral-white-matter", "R-cerebral-cortex", "R-lateral-ventricle", "R-inf-lat-ventricle",
    "R-cerebellum-white-matter", "R-cerebellum-cortex", "R-thalamus", "R-caudate", "R-putamen",
    "R-pallidum", "R-hippocampus", "R-amygdala", "R-accumbens", "R-ventral-DC", "R-vessel",
    "R-choroid-plexus",
]
#: UK Biobank file names (without the NIfTI suffix): the short-axis cine and its labels
UKBB_IMAGE = "sa"
UKBB_LABELS = "seg_sa"


# --------------------------------------------------------------------------------------------
# nnU-Net raw
# --------------------------------------------------------------------------------------------

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist")
    if not path.is_dir():
        raise InputError(path, f"{what} is not a directory")


def _nnunet_cases(images_dir: Path, labels_dir: Path | None, n_channels: int,
                  label_values: tuple[int, ...], ending: str, ignore_label: int | None = None) -> list[Case]:
    def channel_of(p: Path) -> tuple[str, int]:
        m = _CHANNEL_RE.match(p.name[: -len(ending)])
        if m is None:
            raise InputError(p, "image file name lacks the nnU-Net channel suffix _XXXX")
        return m["case"], int(m["ch"])

    groups = files_by_case(nifti_files(images_dir, ending), channel_of)
    cases = []
    for case_id, chans in sorted(groups.items()):
        missing = [c for c in range(n_channels) if c not in chans]
        if missing:
            raise InputError(images_dir / f"{case_id}_{missing[0]:04d}{ending}",
                             f"missing channel file (case {case_id} needs {n_channels} channels)")
        extra = sorted(set(chans) - set(range(n_channels)))
        if extra:
            raise InputError(chans[extra[0]], f"channel {extra[0]} is not in dataset.json's "
                                              f"{n_channels} channel_names")
        label_path = None
        if labels_dir is not None:
            lp = labels_dir / f"{case_id}{ending}"
            if not os.path.lexists(lp):
                raise InputError(lp, f"label map of case {case_id} is missing")
            require_regular_file(lp, "NIfTI file")
            label_path = lp
        cases.append(Case(case_id, case_id,  # the subject is assigned over all cases (assign_subjects)
                          tuple(chans[c] for c in range(n_channels)), label_path,
                          None, label_values, ignore_label))
    return cases


def load_nnunet(root: str | Path, splits_file: str | Path | None = None) -> Dataset:
    """Open an nnU-Net raw dataset directory (``dataset.json``, ``imagesTr``, ``labelsTr``...).

    The dimensionality (2D ``H x W x 1`` or 3D) is read from the first training image's header
    and then required of every case. Nothing else is read until a case is loaded.
    """
    root = Path(root)
    _require_dir(root, "dataset directory")
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise InputError(meta_path, "missing: an nnU-Net dataset needs dataset.json")
    meta = read_dataset_json(meta_path, required=("labels", "channel_names"))
    label_names = label_names_from_json(meta["labels"], meta_path)
    ignore = ignore_label_from_json(meta, meta_path, len(label_names))
    channel_names = [str(meta["channel_names"][k]) for k in sorted(meta["channel_names"], key=int)]
    ending = meta.get("file_ending", ".nii.gz")
    values = tuple(range(len(label_names)))
    subjects = subject_map(splits_file)
    _require_dir(root / "imagesTr", "imagesTr")
    _require_dir(root / "labelsTr", "labelsTr")
    train = _nnunet_cases(root / "imagesTr", root / "labelsTr", len(channel_names), values, ending, ignore)
    if not train:
        raise InputError(root / "imagesTr", f"empty: no *{ending} images")
    test: list[Case] = []
    if (root / "imagesTs").is_dir():
        labels_ts = root / "labelsTs" if (root / "labelsTs").is_dir() else None
        test = _nnunet_cases(root / "imagesTs", labels_ts, len(channel_names), values, ending, ignore)
    nd = len(grid_shape_of(train[0].image_paths[0]))  # from the header alone
    if nd == 4:
        nd_ok = bool(meta.get("time_axis", False))
        if not nd_ok:
            raise InputError(train[0].image_paths[0], "is 4D, expected 2D (H x W x 1) or 3D images "
                                                      "(set \"time_axis\": true in dataset.json for 3D+t)")
    everything, rule = assign_subjects([_with_ndim(c, nd) for c in train + test], subjects)
    train, test = everything[:len(train)], everything[len(train):]
    return Dataset(root, str(meta.get("name", root.name)), "nnunet", label_names, channel_names,
                   train, test, nd, ignore, rule)


def _with_ndim(case: Case, nd: int) -> Case:
    return Case(case.case_id, case.subject_id, case.image_paths, case.label_path, nd, case.label_values,
                case.ignore_label)


# --------------------------------------------------------------------------------------------
# neurite-OASIS
# --------------------------------------------------------------------------------------------

def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, else ``None``; both is an error (two files
    for one image), and so is an entry of that name that is not a regular file."""
    found = [folder / f"{stem}{suf}" for suf in NIFTI_SUFFIXES if os.path.lexists(folder / f"{stem}{suf}")]
    if len(found) > 1:
        raise InputError(found[1], f"is the same image as {found[0].name}: keep one of them")
    if found:
        require_regular_file(found[0], "NIfTI file")
    return found[0] if found else None


def load_oasis(root: str | Path, dim: int = 2, seg: str = "seg4",
               splits_file: str | Path | None = None) -> Dataset:
    """Open a neurite-OASIS directory: one folder per subject.

    Args:
        dim: 2 for ``slice_norm`` / ``slice_seg{4,24}``, 3 for ``aligned_norm`` /
            ``aligned_seg{4,35}``.
        seg: ``"seg4"``, ``"seg24"`` (2D) or ``"seg35"`` (3D).
    """
    root = Path(root)
    _require_dir(root, "dataset directory")
    prefix = {2: "slice", 3: "aligned"}[dim]
    names = {"seg4": OASIS_SEG4, "seg24": OASIS_SEG24, "seg35": OASIS_SEG35}.get(seg)
    if names is None or (dim == 2 and seg == "seg35") or (dim == 3 and seg == "seg24"):
        raise ValueError(f"neurite-OASIS has no {dim}D {seg} labels")
    subject_dirs = sorted(p for p in root.iterdir() if p.is_dir() and find_nifti(p, f"{prefix}_norm"))
    if not subject_dirs:
        raise InputError(root, f"empty: no subject folders with {prefix}_norm.nii.gz")
    values = tuple(range(len(names)))
    cases = []
    for d in subject_dirs:
        seg_path = find_nifti(d, f"{prefix}_{seg}")
        if seg_path is None:
            raise InputError(d / f"{prefix}_{seg}.nii.gz", "missing label map")
        cases.append(Case(d.name, d.name, (find_nifti(d, f"{prefix}_norm"),), seg_path, dim, values))
    return apply_test_split(Dataset(root, root.name, "oasis", list(names), ["T1"], cases, [], dim,
                                    subject_rule=f"{len(cases)} subjects: one per subject folder"), splits_file)


# --------------------------------------------------------------------------------------------
# UK Biobank cine
# --------------------------------------------------------------------------------------------

def ukbb_subject_dirs(folder: Path) -> list[Path]:
    """Subject folders (those holding ``sa.nii.gz``) directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and find_nifti(p, UKBB_IMAGE))


def _ukbb_meta(root: Path) -> tuple[dict, Path] | None:
    """The ``dataset.json`` of a UK Biobank directory: in it, or in its parent (``DIR/train``)."""
    for c in (root / "dataset.json", root.parent / "dataset.json"):
        if os.path.lexists(c):
            return read_dataset_json(c), c
    return None


def load_ukbb(root: str | Path, splits_file: str | Path | None = None) -> Dataset:
    """Open a UK Biobank cine directory: per subject ``sa.nii.gz`` + ``seg_sa.nii.gz`` (4D).

    The subject folders sit in ``root``, or in ``root/train`` (training) and ``root/test``
    (test). Label names are UK Biobank's (background, LV blood pool, LV myocardium, RV blood
    pool) unless a ``dataset.json`` in ``root`` or its parent gives ``labels``; its ``ignore``
    value (see the module doc) marks unlabelled voxels.
    """
    root = Path(root)
    _require_dir(root, "dataset directory")
    split_dirs = {}
    if not ukbb_subject_dirs(root):
        split_dirs = {k: root / k for k in ("train", "test")
                      if (root / k).is_dir() and ukbb_subject_dirs(root / k)}
        if "train" not in split_dirs:
            raise InputError(root, "empty: no subject folders with sa.nii.gz")
    names, ignore, name = list(CARDIAC_LABEL_NAMES), None, root.name
    found = _ukbb_meta(root)
    if found is not None:
        meta, meta_path = found
        if "labels" in meta:
            names = label_names_from_json(meta["labels"], meta_path)
        ignore = ignore_label_from_json(meta, meta_path, len(names))
        name = str(meta.get("name", name))
    values = tuple(range(len(names)))

    def cases_in(folder: Path) -> list[Case]:
        cases = []
        for d in ukbb_subject_dirs(folder):
            seg_path = find_nifti(d, UKBB_LABELS)
            if seg_path is None:
                raise InputError(d / f"{UKBB_LABELS}.nii.gz", "missing label map")
            cases.append(Case(d.name, d.name, (find_nifti(d, UKBB_IMAGE),), seg_path, 4, values, ignore))
        return cases

    if split_dirs:
        train = cases_in(split_dirs["train"])
        test = cases_in(split_dirs["test"]) if "test" in split_dirs else []
    else:
        train, test = cases_in(root), []
    rule = f"{len(train) + len(test)} subjects: one per subject folder"
    return apply_test_split(Dataset(root, name, "ukbb", names, ["cine"], train, test, 4, ignore, rule),
                            splits_file)


# --------------------------------------------------------------------------------------------
# Dispatch, and the inputs of ``inrseg segment``
# --------------------------------------------------------------------------------------------

def detect_layout(root: str | Path) -> str:
    """``"nnunet"`` if ``imagesTr`` or (without UK Biobank subject folders) ``dataset.json`` is
    present, ``"ukbb"`` for ``*/sa.nii.gz`` or ``train/*/sa.nii.gz``, ``"oasis"`` for
    ``*/slice_norm.nii.gz`` or ``*/aligned_norm.nii.gz``."""
    root = Path(root)
    _require_dir(root, "dataset directory")
    if (root / "imagesTr").is_dir():
        return "nnunet"
    if ukbb_subject_dirs(root) or ((root / "train").is_dir() and ukbb_subject_dirs(root / "train")):
        return "ukbb"
    if (root / "dataset.json").exists():
        return "nnunet"
    for d in sorted(root.iterdir()):
        if d.is_dir():
            if find_nifti(d, "sa"):
                return "ukbb"
            if find_nifti(d, "slice_norm") or find_nifti(d, "aligned_norm"):
                return "oasis"
    raise InputError(root, "not a dataset: no dataset.json (nnU-Net), no subject folders with "
                           "sa.nii.gz (UK Biobank) or slice_norm/aligned_norm (neurite-OASIS)")


def open_dataset(root: str | Path, layout: str = "auto", splits_file: str | Path | None = None,
                 oasis_dim: int = 2, oasis_seg: str = "seg4") -> Dataset:
    """Open a dataset directory of any supported layout (``layout="auto"`` detects it)."""
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "nnunet":
        ds = load_nnunet(root, splits_file)
        return apply_test_split(ds, splits_file)
    if layout == "oasis":
        return load_oasis(root, oasis_dim, oasis_seg, splits_file)
    if layout == "ukbb":
        return load_ukbb(root, splits_file)
    raise ValueError(f"unknown layout {layout!r} (nnunet, oasis, ukbb)")


def image_files(path: str | Path) -> list[list[Path]]:
    """Inputs for ``inrseg segment``: a file, a directory of image files (NIfTI, NRRD, MetaImage:
    :data:`~inrseg.data.nifti.IMAGE_SUFFIXES`), a DICOM series folder or a directory of them, a
    UK Biobank subject folder or a directory of them.

    In a directory, nnU-Net channel files (``CASE_0000``, ``CASE_0001``) are grouped per case;
    other files are one case each. A folder holding ``sa.nii.gz`` is a UK Biobank subject: its
    input is ``sa.nii.gz`` alone (never ``seg_sa.nii.gz``). A directory without image files
    that holds DICOM files is one case (its series, read by
    :func:`inrseg.data.sitk_io.dicom_series`: one series per folder); one whose sub-folders
    hold DICOM files gives one case per such folder; one with UK Biobank subject folders gives
    every subject's ``sa.nii.gz``. Returns one list of channel files (or the DICOM folder) per
    case, sorted (:func:`case_id_of` names them).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if not path.is_dir():
        require_regular_file(path, "image file")
        return [[path]]
    sa = find_nifti(path, UKBB_IMAGE)
    if sa is not None:
        return [[sa]]
    files = nifti_files(path, IMAGE_SUFFIXES)
    if not files:
        subjects = ukbb_subject_dirs(path)
        if subjects:
            return [[find_nifti(d, UKBB_IMAGE)] for d in subjects]
        if is_dicom_folder(path):
            return [[path]]
        series = [[d] for d in sorted(path.iterdir()) if d.is_dir() and is_dicom_folder(d)]
        if series:
            return series
        raise InputError(path, f"empty: no image files ({', '.join(IMAGE_SUFFIXES)}), no DICOM files (nor "
                               f"sub-folders of DICOM series or subject folders with sa.nii.gz)")
    def channel_of(p: Path) -> tuple[str, int | None]:
        stem = strip_image_suffix(p.name)
        m = _CHANNEL_RE.match(stem)
        return (m["case"], int(m["ch"])) if m else (stem, None)

    return [sorted(g.values()) for _, g in sorted(files_by_case(files, channel_of).items())]


def nifti_files(folder: Path, ending: str | tuple[str, ...] | None = None) -> list[Path]:
    """The entries of ``folder`` named like NIfTI files (ending in ``ending`` or one of them, if
    given: :data:`~inrseg.data.nifti.IMAGE_SUFFIXES` for every readable image file), sorted;
    each must be a regular file (stat-ed, never opened: a named pipe there is refused, not read)."""
    entries = sorted(p for p in folder.iterdir() if (p.name.endswith(ending) if ending else is_nifti(p)))
    for p in entries:
        require_regular_file(p, "NIfTI file")
    return entries


def case_id_of(files: Iterable[Path]) -> str:
    """Case id of a group of channel files: the name without image suffix and channel suffix
    (a DICOM series folder: its name); a UK Biobank ``<subject>/sa.nii.gz`` is named after its
    subject folder."""
    first = Path(next(iter(files)))
    stem = strip_image_suffix(first.name)
    if stem == UKBB_IMAGE and first.parent.name:
        return first.absolute().parent.name
    m = _CHANNEL_RE.match(stem)
    return m["case"] if m else stem
