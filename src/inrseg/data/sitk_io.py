"""NRRD, MetaImage (``.mha`` / ``.mhd``) and DICOM series through SimpleITK, geometry kept.

:func:`inrseg.data.nifti.load_image` and :func:`~inrseg.data.nifti.load_labels` hand every
input that is not a NIfTI file to :func:`read_as_nifti`: the file (or DICOM folder) is read here
into an in-memory NIfTI image, then checked by the NIfTI reader's own code (voxel sizes, the
affine, the dimensionality, NaN / Inf voxels, labels), so every format gets the same checks.
The hardened NIfTI reader stays the path of ``.nii`` / ``.nii.gz`` files.

Geometry
--------
ITK (and so SimpleITK) places a grid in *LPS* world coordinates: an index ``i`` (x fastest) lies
at ``origin + D @ diag(spacing) @ i`` mm, with ``D`` the direction matrix (its columns are the
voxel axes). NIfTI, nibabel and :attr:`inrseg.data.volume.Volume.affine` use *RAS*: the same
point with its first two coordinates negated. Hence (:func:`affine_from_lps`)::

    affine[:3, :3] = F @ D @ diag(spacing),    affine[:3, 3] = F @ origin,    F = diag(-1, -1, 1)

the affine nibabel gives for the same image written as NIfTI by SimpleITK. ITK's index
``(x, y, z[, t])`` is inrseg's voxel order (axes 0, 1, 2[, 3]); SimpleITK's numpy arrays are
``(z, y, x)`` and are transposed on the way in and out. A 2D file is the ``H x W x 1`` grid
NIfTI would hold (axis 2 along ``F @ [0, 0, 1]``, 1 mm). A 4D file is 3D + time: its spatial
block gives the affine, its fourth spacing the time step.

DICOM series
------------
A folder holds one series (one file per slice, read with SimpleITK's ``ImageSeriesReader`` in
GDCM's slice order); several series in one folder are refused. :func:`dicom_series` gives the
series' UID and files (the DICOM SEG writer references them).

Guards
------
The size is read from the header first; the memory it needs is checked
(:func:`inrseg.core.memory.check_memory`) before any voxel is read; vector / complex voxels are
refused; a named pipe or device is never opened. ITK's own messages (which it prints to the
process's stderr) are captured and become the one-line :class:`~inrseg.core.errors.InputError`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from inrseg.core.errors import InputError
from inrseg.core.files import atomic_path
from inrseg.core.memory import check_memory
from inrseg.data.entries import require_regular_file
from inrseg.data.volume import Volume

__all__ = ["SITK_SUFFIXES", "affine_from_lps", "dicom_series", "grid_shape_sitk", "is_dicom_folder", "is_sitk_file",
           "lps_from_affine", "read_as_nifti", "save_sitk_labels", "sitk_image_of"]

#: file endings read and written through SimpleITK (``.mhd`` keeps its data in a second file)
SITK_SUFFIXES = (".nrrd", ".mha", ".mhd")
#: the ITK reader of each ending: a corrupt ``.nrrd`` is reported as NRRD, never guessed at
_IMAGE_IO = {".nrrd": ("NrrdImageIO", "NRRD file"), ".mha": ("MetaImageIO", "MetaImage file"),
             ".mhd": ("MetaImageIO", "MetaImage file")}
#: RAS <-> LPS: the first two world axes flip
_FLIP = np.diag([-1.0, -1.0, 1.0])
#: bytes per voxel of the scalar pixel types inrseg reads
_ITEMSIZE = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}
#: the DICOM preamble's magic: bytes 128..131 of a DICOM Part 10 file
_DICM = b"DICM"


def is_sitk_file(path: str | Path) -> bool:
    """Whether ``path`` has a file name SimpleITK reads here (:data:`SITK_SUFFIXES`)."""
    return str(path).endswith(SITK_SUFFIXES)


# --------------------------------------------------------------------------------------------
# geometry: LPS (ITK) <-> RAS (NIfTI)
# --------------------------------------------------------------------------------------------

def affine_from_lps(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The ``(4, 4)`` RAS voxel -> world (mm) affine of an ITK grid (see the module doc).

    Args:
        origin, spacing: ``d`` values each (``d`` = 2, 3 or 4; a fourth axis is time, left out).
        direction: the ``d x d`` direction matrix, row-major (as ``GetDirection()`` gives it).
    """
    d = len(origin)
    n = min(d, 3)
    rot = np.asarray(direction, dtype=np.float64).reshape(d, d)[:n, :n]
    linear, offset = np.eye(3), np.zeros(3)
    linear[:n, :n] = rot @ np.diag(np.asarray(spacing, dtype=np.float64)[:n])
    offset[:n] = np.asarray(origin, dtype=np.float64)[:n]
    affine = np.eye(4)
    affine[:3, :3] = _FLIP @ linear
    affine[:3, 3] = _FLIP @ offset
    return affine


def lps_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """The inverse of :func:`affine_from_lps` for a 3D grid: ``(origin, spacing, direction)``
    (3, 3 and 9 values, direction row-major) of the RAS ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = _FLIP @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    return (tuple(float(v) for v in _FLIP @ affine[:3, 3]), tuple(float(v) for v in spacing),
            tuple(float(v) for v in (linear / spacing).ravel()))


def sitk_image_of(data: np.ndarray, like: Volume) -> sitk.Image:
    """A SimpleITK image of the grid array ``data`` (``like.shape``, inrseg voxel order) placed
    on ``like``'s grid: its affine (2D grids as ``H x W x 1``) and, for 3D + t, its time step."""
    arr = data[..., None] if like.spatial_ndim == 2 else data
    # ITK index (x, y, z) is array [z, y, x]
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.T), isVector=False)
    origin, spacing, direction = lps_from_affine(like.affine)
    if arr.ndim == 4:
        rot = np.eye(4)
        rot[:3, :3] = np.reshape(direction, (3, 3))
        origin, spacing = origin + (0.0,), spacing + (float(like.time_step or 1.0),)
        direction = tuple(float(v) for v in rot.ravel())
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


# --------------------------------------------------------------------------------------------
# ITK's messages
# --------------------------------------------------------------------------------------------

#: ITK's prefixes before the message itself: the file and line, the class and its address
_ITK_NOISE = re.compile(r"^(Exception thrown in SimpleITK .*|/\S+:\d+:|WARNING: In .*|\s*)$")
_ITK_PREFIX = re.compile(r"^(itk::ERROR: |ITK ERROR: )?\w+\(0x[0-9a-f]+\): |^\[\w+\] \w+: |^MetaImage: \w+: ")


def _itk_problem(text: str, last: bool = True) -> str:
    """The informative part of ITK's message ``text``, prefixes dropped, short: its last line
    (an exception's innermost reason), or (``last=False``: what ITK printed) its first two."""
    lines = []
    for line in text.splitlines():
        if _ITK_NOISE.match(line):
            continue
        line = line.strip()
        while (stripped := _ITK_PREFIX.sub("", line)) != line:
            line = stripped
        lines.append(line)
    line = (lines[-1] if last else "; ".join(lines[:2])) if lines else ""
    return line if len(line) <= 160 else line[:157] + "..."


@contextlib.contextmanager
def _itk_errors(path: Path, what: str) -> Iterator[None]:
    """Run SimpleITK calls with the process's stderr captured (ITK prints warnings and
    MetaImage its errors there, around our one line); a failure becomes one
    :class:`InputError` naming ``path``: ``corrupt or unreadable <what> (<ITK's reason>)``."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        failure: str | None = None
        try:
            yield
        except RuntimeError as exc:
            failure = str(exc)
        except MemoryError:
            raise InputError(path, "not enough memory to read it") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failure is not None:
            sink.seek(0)
            printed = sink.read(4096).decode("utf-8", "replace")
            reason = _itk_problem(printed, last=False) or _itk_problem(failure)
            raise InputError(path, f"corrupt or unreadable {what}" + (f" ({reason})" if reason else ""))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _information(path: Path, files: Sequence[Path] | None = None) -> tuple[sitk.ImageFileReader, str, tuple[int, ...]]:
    """The reader of ``path`` (a file, or a DICOM folder read through its ``files``) with its
    header read, what the file is called in messages, and the grid size (ITK order)."""
    if files is None:
        io_name, what = _IMAGE_IO[next(s for s in SITK_SUFFIXES if path.name.endswith(s))]
        require_regular_file(path, what)
        first = path
    else:
        io_name, what, first = "GDCMImageIO", "DICOM series", files[0]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first))
    reader.SetImageIO(io_name)
    with _itk_errors(path, what):
        reader.ReadImageInformation()
    size = tuple(int(v) for v in reader.GetSize())
    if files is not None:
        size = size[:2] + (len(files),)
    pixel = reader.GetPixelID()
    if reader.GetNumberOfComponents() != 1 or pixel not in _ITEMSIZE:
        raise InputError(path, f"holds {sitk.GetPixelIDValueAsString(pixel)} voxels "
                               f"({reader.GetNumberOfComponents()} per voxel); inrseg reads one scalar per voxel "
                               f"(store colour channels as separate files)")
    if not size or min(size) < 1:
        raise InputError(path, f"header gives an invalid size {size}")
    nvox = float(np.prod(size, dtype=np.float64))
    # ITK's buffer, the numpy copy of it, and the float32 copy load_image makes
    check_memory(path, nvox * (2 * _ITEMSIZE[pixel] + 4), f"reading {size} voxels")
    return reader, what, size


def grid_shape_sitk(path: str | Path) -> tuple[int, ...]:
    """The grid size of a NRRD / MetaImage file (inrseg's voxel order) or of a DICOM series
    folder (columns, rows, slices) from its header alone: no voxel is read."""
    path = Path(path)
    files = dicom_series(path)[1] if path.is_dir() else None
    shape = _information(path, files)[2]
    return shape + (1,) if len(shape) == 2 else shape


def read_as_nifti(path: str | Path) -> nib.Nifti1Image:
    """Read a NRRD / MetaImage file, or the DICOM series in the folder ``path``, into an
    in-memory NIfTI image: data in inrseg voxel order (``X x Y x Z [x T]``, 2D as ``H x W x 1``,
    the stored voxel type), the RAS affine of :func:`affine_from_lps`, and for 3D + t the time
    step as the fourth zoom. The caller (:mod:`inrseg.data.nifti`) applies its checks to it.

    Raises:
        InputError: a missing, corrupt or unreadable file; no or several DICOM series in the
            folder; vector voxels; more voxels than the available memory holds.
    """
    path = Path(path)
    if path.is_dir():
        _, files = dicom_series(path)
        _, what, _ = _information(path, files)
        series = sitk.ImageSeriesReader()
        series.SetFileNames([str(f) for f in files])
        with _itk_errors(path, what):
            image = series.Execute()
    else:
        reader, what, _ = _information(path)
        with _itk_errors(path, what):
            image = reader.Execute()
    affine = affine_from_lps(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    spacing = image.GetSpacing()
    data = sitk.GetArrayFromImage(image).T  # (z, y, x) -> inrseg's (x, y, z)
    del image
    if data.ndim == 2:
        data = data[..., None]
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)  # an explicit dtype: nibabel refuses int64 otherwise
    if data.ndim == 4:
        img.header.set_zooms(tuple(img.header.get_zooms()[:3]) + (float(spacing[3]),))
    return img


# --------------------------------------------------------------------------------------------
# DICOM series folders
# --------------------------------------------------------------------------------------------

def _regular_entries(folder: Path) -> list[Path]:
    """The files directly in ``folder`` (sub-folders skipped); any other kind of entry (a named
    pipe, a socket) is refused by name, since GDCM would open it."""
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            require_regular_file(p, "DICOM file")
            out.append(p)
    return out


def is_dicom_folder(folder: str | Path) -> bool:
    """Whether ``folder`` directly holds a DICOM file (the ``DICM`` magic at byte 128): cheap,
    for finding inputs; :func:`dicom_series` reads the series properly. Only regular files are
    opened."""
    for p in sorted(Path(folder).iterdir()):
        try:
            st = os.stat(p)
            if stat.S_ISREG(st.st_mode) and st.st_size >= 132:
                with open(p, "rb") as f:
                    if f.read(132)[128:] == _DICM:
                        return True
        except OSError:  # unreadable entries are named when the series is read
            continue
    return False


def dicom_series(folder: str | Path) -> tuple[str, list[Path]]:
    """The one DICOM series in ``folder``: its SeriesInstanceUID and its files in slice order
    (GDCM's, along the slice normal).

    Raises:
        InputError: no DICOM series there, or several (one series per folder), or an entry that
            is not a regular file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder of DICOM slices")
    if not _regular_entries(folder):
        raise InputError(folder, "empty: no DICOM files in this folder")
    with _itk_errors(folder, "DICOM series"):
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(folder, "no DICOM series in this folder (none of its files is a DICOM image)")
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise InputError(folder, f"holds {len(ids)} DICOM series ({shown}): put each series in its own folder")
    with _itk_errors(folder, "DICOM series"):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    return str(ids[0]), [Path(f) for f in files]


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def save_sitk_labels(labels: np.ndarray, path: str | Path, like: Volume) -> Path:
    """Write a label map ``(*S,)`` as ``.nrrd`` or ``.mha`` (by ``path``'s ending, compressed)
    on the grid of ``like`` (its affine, 2D-ness, time step), as
    :func:`inrseg.data.nifti.save_labels` does for NIfTI: uint8 when the values fit, else int16.
    Atomic. ``.mhd`` is refused: its data file would keep the temporary's name."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the reference grid {like.shape}")
    if not str(path).endswith((".nrrd", ".mha")):
        raise ValueError(f"{path}: save_sitk_labels writes .nrrd or .mha")
    dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.int16
    image = sitk_image_of(labels.astype(dtype), like)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path
