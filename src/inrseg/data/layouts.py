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

import re
from pathlib import Path
from typing import Iterable

import nibabel as nib

from inrseg.core.errors import InputError
from inrseg.core.files import read_json
from inrseg.data.cases import Case, Dataset
from inrseg.data.nifti import NIFTI_SUFFIXES, is_nifti, strip_nifti_suffix
from inrseg.data.splits import apply_test_split, subject_map, subject_of

__all__ = ["CARDIAC_LABEL_NAMES", "IGNORE_KEY", "OASIS_SEG24", "OASIS_SEG35", "OASIS_SEG4", "UKBB_IMAGE",
           "UKBB_LABELS", "case_id_of", "detect_layout", "find_nifti", "ignore_label_from_json",
           "image_files", "label_names_from_json", "load_nnunet", "load_oasis", "load_ukbb", "open_dataset",
           "ukbb_subject_dirs"]

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
#: the ``dataset.json`` key (top level, or a name in ``labels``) of the ignore value
IGNORE_KEY = "ignore"


# --------------------------------------------------------------------------------------------
# nnU-Net raw
# --------------------------------------------------------------------------------------------

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist")
    if not path.is_dir():
        raise InputError(path, f"{what} is not a directory")


def label_names_from_json(labels: dict, path: Path) -> list[str]:
    """nnU-Net ``labels`` ({name: value}) -> names indexed by value; values must be 0..C-1.
    An entry named ``"ignore"`` (nnU-Net v2's ignore label) is not a class and is left out."""
    if not isinstance(labels, dict):
        raise InputError(path, "'labels' must be an object mapping names to values")
    try:
        by_value = {int(v): str(k) for k, v in labels.items() if k != IGNORE_KEY}
    except (TypeError, ValueError):
        raise InputError(path, "'labels' must map names to integer values "
                               "(region-based labels are not supported)") from None
    if sorted(by_value) != list(range(len(by_value))) or 0 not in by_value:
        raise InputError(path, f"label values {sorted(by_value)} must be consecutive from 0")
    return [by_value[i] for i in range(len(by_value))]


def ignore_label_from_json(meta: dict, path: Path, num_classes: int | None = None) -> int | None:
    """The ignore value of a ``dataset.json``: ``meta["ignore"]`` or ``meta["labels"]["ignore"]``
    (nnU-Net v2), or ``None``. It must be a non-negative integer that is not a class value."""
    found = []
    for where, value in (("'ignore'", meta.get(IGNORE_KEY)),
                         ("'labels' -> 'ignore'", (meta.get("labels") or {}).get(IGNORE_KEY)
                          if isinstance(meta.get("labels"), dict) else None)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
            raise InputError(path, f"{where} must be a non-negative integer label value, got {value!r}")
        found.append(int(value))
    if not found:
        return None
    if len(set(found)) > 1:
        raise InputError(path, f"'ignore' ({found[0]}) and 'labels' -> 'ignore' ({found[1]}) disagree")
    if num_classes is not None and found[0] < num_classes:
        raise InputError(path, f"the ignore value {found[0]} is also a class value (0..{num_classes - 1})")
    return found[0]


def _nnunet_cases(images_dir: Path, labels_dir: Path | None, n_channels: int,
                  label_values: tuple[int, ...], subject_map: dict[str, str],
                  ending: str, ignore_label: int | None = None) -> list[Case]:
    files = sorted(p for p in images_dir.iterdir() if p.name.endswith(ending))
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        m = _CHANNEL_RE.match(p.name[: -len(ending)])
        if m is None:
            raise InputError(p, "image file name lacks the nnU-Net channel suffix _XXXX")
        groups.setdefault(m["case"], {})[int(m["ch"])] = p
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
            if not lp.exists():
                raise InputError(lp, f"label map of case {case_id} is missing")
            label_path = lp
        cases.append(Case(case_id, subject_map.get(case_id, subject_of(case_id)),
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
    meta = read_json(meta_path)
    if "labels" not in meta or "channel_names" not in meta:
        raise InputError(meta_path, "needs 'labels' and 'channel_names'")
    label_names = label_names_from_json(meta["labels"], meta_path)
    ignore = ignore_label_from_json(meta, meta_path, len(label_names))
    channel_names = [str(meta["channel_names"][k]) for k in sorted(meta["channel_names"], key=int)]
    ending = meta.get("file_ending", ".nii.gz")
    values = tuple(range(len(label_names)))
    subjects = subject_map(splits_file)
    _require_dir(root / "imagesTr", "imagesTr")
    _require_dir(root / "labelsTr", "labelsTr")
    train = _nnunet_cases(root / "imagesTr", root / "labelsTr", len(channel_names), values,
                          subjects, ending, ignore)
    if not train:
        raise InputError(root / "imagesTr", f"empty: no *{ending} images")
    test: list[Case] = []
    if (root / "imagesTs").is_dir():
        labels_ts = root / "labelsTs" if (root / "labelsTs").is_dir() else None
        test = _nnunet_cases(root / "imagesTs", labels_ts, len(channel_names), values,
                             subjects, ending, ignore)
    nd = _peek_ndim(train[0].image_paths[0])
    if nd == 4:
        nd_ok = bool(meta.get("time_axis", False))
        if not nd_ok:
            raise InputError(train[0].image_paths[0], "is 4D, expected 2D (H x W x 1) or 3D images "
                                                      "(set \"time_axis\": true in dataset.json for 3D+t)")
    train = [_with_ndim(c, nd) for c in train]
    test = [_with_ndim(c, nd) for c in test]
    return Dataset(root, str(meta.get("name", root.name)), "nnunet", label_names, channel_names,
                   train, test, nd, ignore)


def _with_ndim(case: Case, nd: int) -> Case:
    return Case(case.case_id, case.subject_id, case.image_paths, case.label_path, nd, case.label_values,
                case.ignore_label)


def _peek_ndim(path: Path) -> int:
    """Grid axes of a NIfTI file from its header only (cheap)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported as a bad file
        raise InputError(path, f"unreadable NIfTI header ({type(exc).__name__})") from None
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return len(dims)


# --------------------------------------------------------------------------------------------
# neurite-OASIS
# --------------------------------------------------------------------------------------------

def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists first, else ``None``."""
    for suf in NIFTI_SUFFIXES:
        if (folder / f"{stem}{suf}").exists():
            return folder / f"{stem}{suf}"
    return None


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
    return apply_test_split(Dataset(root, root.name, "oasis", list(names), ["T1"], cases, [], dim),
                         splits_file)


# --------------------------------------------------------------------------------------------
# UK Biobank cine
# --------------------------------------------------------------------------------------------

def ukbb_subject_dirs(folder: Path) -> list[Path]:
    """Subject folders (those holding ``sa.nii.gz``) directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and find_nifti(p, UKBB_IMAGE))


def _ukbb_meta(root: Path) -> tuple[dict, Path] | None:
    """The ``dataset.json`` of a UK Biobank directory: in it, or in its parent (``DIR/train``)."""
    for c in (root / "dataset.json", root.parent / "dataset.json"):
        if c.is_file():
            return read_json(c), c
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
    return apply_test_split(Dataset(root, name, "ukbb", names, ["cine"], train, test, 4, ignore),
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
    """Inputs for ``inrseg segment``: a file, a directory of NIfTI files, a UK Biobank subject
    folder or a directory of them.

    In a directory, nnU-Net channel files (``CASE_0000``, ``CASE_0001``) are grouped per case;
    other files are one case each. A folder holding ``sa.nii.gz`` is a UK Biobank subject: its
    input is ``sa.nii.gz`` alone (never ``seg_sa.nii.gz``). A directory without NIfTI files but
    with subject folders gives every subject's ``sa.nii.gz``. Returns one list of channel files
    per case, sorted (:func:`case_id_of` names them).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_file():
        return [[path]]
    sa = find_nifti(path, UKBB_IMAGE)
    if sa is not None:
        return [[sa]]
    files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        subjects = ukbb_subject_dirs(path)
        if subjects:
            return [[find_nifti(d, UKBB_IMAGE)] for d in subjects]
        raise InputError(path, "empty: no .nii or .nii.gz files (nor subject folders with sa.nii.gz)")
    groups: dict[str, list[Path]] = {}
    for p in files:
        stem = strip_nifti_suffix(p.name)
        m = _CHANNEL_RE.match(stem)
        groups.setdefault(m["case"] if m else stem, []).append(p)
    return [sorted(g) for _, g in sorted(groups.items())]


def case_id_of(files: Iterable[Path]) -> str:
    """Case id of a group of channel files: the name without NIfTI suffix and channel suffix;
    a UK Biobank ``<subject>/sa.nii.gz`` is named after its subject folder."""
    first = Path(next(iter(files)))
    stem = strip_nifti_suffix(first.name)
    if stem == UKBB_IMAGE and first.parent.name:
        return first.absolute().parent.name
    m = _CHANNEL_RE.match(stem)
    return m["case"] if m else stem
