"""Ensembles, nnU-Net-style: the mean of several models' (or folds', or seeds') class probabilities,
whose argmax are the ensemble's labels.

Probability files are what ``inrseg segment --save-probabilities`` writes (and ``inrseg
ensemble --save-probabilities`` writes back), one per case, ``<case>.npz`` holding

* ``probabilities``: ``(K, *S)`` float32, the class probabilities on the label map's grid;
* ``label_names``: ``(K,)`` strings, the class names indexed by label value;
* ``affine``: ``(4, 4)`` float64, voxel index -> world mm of that grid;
* ``time_step`` (optional): seconds between the frames of a 3D + t grid.

:func:`ensemble_folders` averages such folders: every folder must hold the same case ids, and
each case the same label names, grid shape and affine in every folder (refused in one line
otherwise, before anything is written); the labels (``<case>.nii.gz``) and, if asked, the mean
probabilities are written into a folder that appears whole or not at all. :class:`ProbabilityMean`
is the one definition of the mean, used here and by ``inrseg bench``'s seed ensembles.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from inrseg.core.errors import InputError
from inrseg.core.files import atomic_dir, atomic_path, claim_output, refuse_overlap
from inrseg.core.memory import check_memory
from inrseg.core.progress import progress, status
from inrseg.data.nifti import save_labels
from inrseg.data.volume import Volume

__all__ = ["PROBABILITY_SUFFIX", "ProbabilityFile", "ProbabilityMean", "SeedEnsemble", "ensemble_folders",
           "ensemble_probabilities", "probability_cases", "read_probabilities", "read_probability_header",
           "write_probabilities"]

#: the file name ending of a case's probabilities: ``<case>.npz``
PROBABILITY_SUFFIX = ".npz"
#: the arrays a probability file must hold
_KEYS = ("probabilities", "label_names", "affine")
#: how far two affines may differ (mm) and still be one grid (as for an image and its labels)
AFFINE_ATOL = 1e-3


@dataclass
class ProbabilityFile:
    """One case's probability file: ``probabilities`` ``(K, *S)`` (``None`` when only the header
    was read: then ``shape`` is its shape), ``label_names``, ``affine`` (4 x 4), ``time_step``."""

    path: Path
    shape: tuple[int, ...]
    label_names: list[str]
    affine: np.ndarray
    time_step: float | None = None
    probabilities: np.ndarray | None = None

    @property
    def spatial_ndim(self) -> int:
        return len(self.shape) - 1


class ProbabilityMean:
    """The running mean of probability arrays of one shape, summed in float32 (the files' type;
    half the memory of float64, and a sum of a few members loses nothing that matters to an
    argmax). The mean of one array is that array, bit for bit."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self.count = 0

    def add(self, probabilities: np.ndarray) -> None:
        """Add one ``(K, *S)`` array (``ValueError`` if its shape differs from the first's)."""
        p = np.asarray(probabilities, dtype=np.float32)
        if self._sum is None:
            self._sum = p.copy()
        elif p.shape != self._sum.shape:
            raise ValueError(f"probabilities of shape {p.shape} cannot be averaged with {self._sum.shape}")
        else:
            self._sum += p
        self.count += 1

    def mean(self) -> np.ndarray:
        """The mean ``(K, *S)`` float32 of the arrays added (``ValueError`` if none was)."""
        if self._sum is None:
            raise ValueError("the mean of no probabilities")
        return (self._sum / np.float32(self.count)).astype(np.float32)

    def labels(self) -> np.ndarray:
        """The argmax ``(*S,)`` int64 of :meth:`mean`: the ensemble's label map."""
        return self.mean().argmax(0).astype(np.int64)


class SeedEnsemble:
    """The probabilities of one method's runs (``bench``'s seeds), averaged per case: ``keep``
    receives each run's probabilities of each validation (``"val"``) and test (``"test"``)
    case. Holds ``K x voxels`` float32 per case, for every case of both sets."""

    def __init__(self) -> None:
        self.means: dict[str, dict[str, ProbabilityMean]] = {"val": {}, "test": {}}

    def keep(self, which: str, case_id: str, probabilities: np.ndarray) -> None:
        """Add one run's probabilities ``(K, *S)`` of case ``case_id`` of ``which`` set."""
        self.means[which].setdefault(case_id, ProbabilityMean()).add(probabilities)

    def labels(self, which: str, case_id: str) -> np.ndarray:
        """The ensemble's label map ``(*S,)`` of case ``case_id`` of ``which`` set."""
        return self.means[which][case_id].labels()


def ensemble_probabilities(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The mean ``(K, *S)`` float32 of the probability arrays ``arrays`` (all of one shape)."""
    acc = ProbabilityMean()
    for a in arrays:
        acc.add(a)
    return acc.mean()


# ============================================================================================
# probability files
# ============================================================================================

def write_probabilities(path: str | Path, probabilities: np.ndarray, label_names: Sequence[str],
                        affine: np.ndarray, time_step: float | None = None) -> Path:
    """Write one case's probability file (module docstring), atomically."""
    path = Path(path)
    extra = {} if time_step is None else {"time_step": np.float64(time_step)}
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, probabilities=np.asarray(probabilities, dtype=np.float32),
                            label_names=np.array(list(label_names)), affine=np.asarray(affine, dtype=np.float64),
                            **extra)
    return path


def _not_ours(path: Path, why: str) -> InputError:
    return InputError(path, f"is not a probability file of `inrseg segment --save-probabilities` ({why})")


def read_probability_header(path: str | Path) -> ProbabilityFile:
    """Read a probability file's label names, affine, time step and the shape of its
    probabilities (from the array's header: nothing large is decompressed); checked (one
    :class:`InputError` line naming ``path`` otherwise)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in _KEYS:
                if f"{key}.npy" not in names:
                    raise _not_ours(path, f"no {key!r} array")
            with zf.open("probabilities.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
        with np.load(path, allow_pickle=False) as z:
            label_names, affine = z["label_names"], z["affine"]
            time_step = z["time_step"] if "time_step" in z.files else None
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError) as exc:
        raise _not_ours(path, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None
    if dtype.kind != "f" or not 3 <= len(shape) <= 5 or min(shape) < 1:
        raise _not_ours(path, f"'probabilities' is {dtype} of shape {tuple(shape)}; expected floats (K, *S) of a "
                              f"2D, 3D or 3D+t grid")
    if label_names.dtype.kind != "U" or label_names.shape != (shape[0],):
        raise _not_ours(path, f"'label_names' {label_names.dtype} of shape {label_names.shape} does not name the "
                              f"{shape[0]} classes of 'probabilities'")
    if affine.shape != (4, 4) or affine.dtype.kind not in "fiu" or not np.isfinite(affine).all():
        raise _not_ours(path, f"'affine' of shape {affine.shape} is not a finite 4 x 4 matrix")
    step = None
    if time_step is not None:
        if time_step.shape != () or time_step.dtype.kind not in "fiu" or not math.isfinite(float(time_step)):
            raise _not_ours(path, "'time_step' is not one finite number")
        step = float(time_step)
    return ProbabilityFile(path, tuple(int(n) for n in shape), [str(n) for n in label_names],
                           np.asarray(affine, dtype=np.float64), step)


def read_probabilities(path: str | Path) -> ProbabilityFile:
    """:func:`read_probability_header` and the probabilities themselves (checked to fit in
    memory before they are decompressed, and to be finite and non-negative)."""
    head = read_probability_header(path)
    check_memory(head.path, 4 * math.prod(head.shape), "its probabilities")
    try:
        with np.load(head.path, allow_pickle=False) as z:
            probs = np.asarray(z["probabilities"], dtype=np.float32)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise _not_ours(head.path, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None
    if probs.shape != head.shape:
        raise _not_ours(head.path, f"'probabilities' is {probs.shape}, its header says {head.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise _not_ours(head.path, "'probabilities' holds negative or non-finite values")
    head.probabilities = probs
    return head


def probability_cases(folder: Path) -> list[str]:
    """The case ids of the probability files in ``folder`` (``<case>.npz``; hidden files, such
    as an interrupted writer's temporaries, skipped), sorted."""
    if not folder.is_dir():
        raise InputError(folder, "is not a folder (--input names a folder of `segment --save-probabilities` "
                                 "output)")
    ids = sorted(p.name[: -len(PROBABILITY_SUFFIX)] for p in folder.iterdir()
                 if p.name.endswith(PROBABILITY_SUFFIX) and not p.name.startswith(".") and p.is_file())
    if not ids:
        raise InputError(folder, "holds no probability files (<case>.npz, written by `inrseg segment "
                                 "--save-probabilities`)")
    return ids


def _check_same_cases(inputs: Sequence[Path]) -> list[str]:
    """The case ids every folder of ``inputs`` holds; refuses a folder that lacks one of the
    first folder's cases, or holds one that the first lacks, naming the folder and the case."""
    first = probability_cases(inputs[0])
    for folder in inputs[1:]:
        ids = probability_cases(folder)
        missing, extra = sorted(set(first) - set(ids)), sorted(set(ids) - set(first))
        if missing:
            raise InputError(folder, f"has no probabilities of case {missing[0]!r} ({inputs[0]} has "
                                     f"{missing[0]}{PROBABILITY_SUFFIX}); every --input must hold the same cases")
        if extra:
            raise InputError(folder, f"has probabilities of case {extra[0]!r}, which {inputs[0]} lacks; every "
                                     f"--input must hold the same cases")
    return first


def _check_same_grid(ref: ProbabilityFile, other: ProbabilityFile) -> None:
    """Refuse ``other`` (naming it) unless it has ``ref``'s label names, shape and affine."""
    if other.label_names != ref.label_names:
        raise InputError(other.path, f"label names {other.label_names} differ from {ref.path}'s {ref.label_names}")
    if other.shape != ref.shape:
        raise InputError(other.path, f"probabilities of shape {other.shape} do not match {ref.path}'s {ref.shape}")
    if not np.allclose(other.affine, ref.affine, rtol=0.0, atol=AFFINE_ATOL):
        raise InputError(other.path, f"affine differs from {ref.path}'s (not the same grid)")


# ============================================================================================
# inrseg ensemble
# ============================================================================================

def ensemble_folders(inputs: Sequence[str | Path], output: str | Path, save_probabilities: bool = False,
                     force: bool = False) -> int:
    """What ``inrseg ensemble`` does: for every case, the mean of the probability files of
    ``inputs`` (module docstring), its argmax written as ``OUTPUT/<case>.nii.gz`` (uint8 labels
    with the files' affine) and, with ``save_probabilities``, the mean as ``OUTPUT/<case>.npz``.
    Every folder's cases and every file's header are checked before anything is written;
    ``output`` (replaced only with ``force``) appears whole or not at all. Returns the number
    of cases."""
    inputs, output = [Path(p) for p in inputs], Path(output)
    if not inputs:
        raise InputError(None, "--input: at least one folder of probabilities")
    refuse_overlap({"--output": output}, {"--input": inputs})
    seen: dict[Path, Path] = {}
    for folder in inputs:
        if folder.resolve() in seen:
            raise InputError(folder, f"is given twice as --input (also as {seen[folder.resolve()]})")
        seen[folder.resolve()] = folder
    cases = _check_same_cases(inputs)
    for cid in progress(cases, desc="checking probability files"):
        heads = [read_probability_header(folder / f"{cid}{PROBABILITY_SUFFIX}") for folder in inputs]
        for head in heads[1:]:
            _check_same_grid(heads[0], head)
    with claim_output(output), atomic_dir(output, force) as tmp:
        for cid in progress(cases, desc=f"ensembling {len(inputs)} folders"):
            acc, first = ProbabilityMean(), None
            for folder in inputs:
                member = read_probabilities(folder / f"{cid}{PROBABILITY_SUFFIX}")
                if first is None:
                    first = member
                _check_same_grid(first, member)  # a file replaced since the check above
                acc.add(member.probabilities)
            like = Volume(acc.labels(), first.affine, first.spatial_ndim, first.time_step)
            save_labels(like.data, tmp / f"{cid}.nii.gz", like=like)
            if save_probabilities:
                write_probabilities(tmp / f"{cid}{PROBABILITY_SUFFIX}", acc.mean(), first.label_names,
                                    first.affine, first.time_step)
    status(f"ensemble: wrote {len(cases)} label maps{' and probabilities' if save_probabilities else ''}, the mean "
           f"of {len(inputs)} folders, to {output}")
    return len(cases)
