"""Reading and writing NIfTI images and label maps (via nibabel), keeping affine, spacing and dtype.

Conventions
-----------
* Images are read into ``(C, *S)`` float32 :class:`~inrseg.data.volume.Volume` objects, one file
  per channel; label maps into ``(*S,)`` int64 ones.
* ``H x W x 1`` files are 2D images: ``S = (H, W)``; they are written back as ``H x W x 1``.
* 4D files ``X x Y x Z x T`` (cine MRI) have ``S = (X, Y, Z, T)``; they are accepted only where
  a caller allows time (``expect_ndim=4``), otherwise "4D where 3D is expected" is an error.
* Reading is hardened: the header's claimed size is checked against the file and the available
  memory before anything large is allocated, and a ``.nii.gz`` is inflated to its end so that
  gzip's CRC-32 is verified.
* All writes are atomic (:func:`inrseg.core.files.atomic_path`): a temporary file in the target
  directory, renamed on success.

Every problem with a file raises :class:`~inrseg.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import nibabel as nib
import numpy as np

from inrseg.core.errors import InputError
from inrseg.core.files import atomic_path
from inrseg.core.memory import check_memory
from inrseg.data.entries import require_regular_file
from inrseg.data.sitk_io import SITK_SUFFIXES, grid_shape_sitk, is_sitk_file, read_as_nifti
from inrseg.data.volume import Volume

__all__ = ["IMAGE_SUFFIXES", "MAX_LABEL_VALUE", "NIFTI_SUFFIXES", "VOXEL_MM_RANGE", "grid_shape_of", "is_nifti",
           "load_image", "load_labels", "save_image", "save_labels", "strip_image_suffix", "strip_nifti_suffix"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: every image file ending inrseg reads: NIfTI here, NRRD and MetaImage through SimpleITK
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES


def strip_image_suffix(name: str) -> str:
    """``"case_0000.nii.gz"`` / ``"case_0000.nrrd"`` -> ``"case_0000"`` (:data:`IMAGE_SUFFIXES`)."""
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.endswith(s)), name)


def _via_sitk(path: Path) -> bool:
    """Whether ``path`` is read through SimpleITK (:mod:`inrseg.data.sitk_io`): a NRRD or
    MetaImage file, or a folder (a DICOM series) not named like a NIfTI file."""
    return is_sitk_file(path) or (path.is_dir() and not is_nifti(path))


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``)."""
    return str(path).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``"case_0000.nii.gz"`` -> ``"case_0000"``."""
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


#: bytes a NIfTI header may precede its data by (extensions included) before we call it corrupt
_MAX_HEADER_BYTES = 64 * 2**20
#: bytes of data after the voxels that a file may carry before we call it corrupt (padding)
_MAX_TRAILING_BYTES = 64 * 2**20
#: voxel sizes (mm) outside this range (1 nm .. 1 km) come from a corrupt header, not a scanner
VOXEL_MM_RANGE = (1e-6, 1e6)
#: the largest label value a label map may hold (int32's largest)
MAX_LABEL_VALUE = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _parse_header(path: Path, head: bytes) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` (at least 540 bytes if the file
    has them), checked for a sane shape and voxel type."""
    if len(head) < 348:
        raise InputError(path, f"not a NIfTI file (only {len(head)} bytes, a header needs 348)")
    size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
    klass = nib.Nifti2Header if 540 in (size_le, size_be) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head), check=True)
        raw = klass(head[:klass.template_dtype.itemsize], check=False)  # as stored, not "fixed"
        shape = tuple(int(v) for v in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises several kinds for a malformed header
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"not a NIfTI file (no valid NIfTI header: {msg})") from None
    if not shape or any(v < 1 for v in shape):
        raise InputError(path, f"NIfTI header gives an invalid shape {shape}")
    if dtype.fields is not None or dtype.kind not in "biuf":
        kind = "RGB" if dtype.fields is not None else str(dtype)
        raise InputError(path, f"holds {kind} voxels; inrseg reads one scalar per voxel "
                               f"(store colour channels as separate files)")
    if offset > _MAX_HEADER_BYTES:
        raise InputError(path, f"NIfTI header puts the data at byte {offset}: corrupt header")
    _check_pixdim(path, raw)
    return header


@contextlib.contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Silence nibabel's logger while we read: it logs fix-ups and header problems to stderr
    itself ("data code ... not recognized"), around our one-line error, which already says what
    is wrong with the file."""
    logger = logging.getLogger("nibabel")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_nifti(path: Path) -> tuple[os.stat_result, BinaryIO]:
    """``path``'s stat and the file opened for reading (a ``.nii.gz`` inflating); it must be a
    regular file (stat-ed first: a named pipe is never opened) with a NIfTI name."""
    st = require_regular_file(path, "NIfTI file")
    if not is_nifti(path):
        raise InputError(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    return st, (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb"))


def _read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file (see :func:`_read_file`) with nibabel's own logging silenced; a NRRD /
    MetaImage file or a DICOM series folder through :func:`inrseg.data.sitk_io.read_as_nifti`
    (its size and memory checked there), with the same geometry checks."""
    if _via_sitk(path):
        img = read_as_nifti(path)
        _check_geometry(path, img)
        return np.asanyarray(img.dataobj), img
    with _nibabel_quiet():
        return _read_file(path)


def _read_file(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file fully into memory (float32 via the header's scaling), with clear errors.

    Before anything large is allocated, the header's claimed data size is checked against the
    file (for ``.nii.gz``, against the gzip trailer's length field) and against the available
    memory. A ``.nii.gz`` is inflated to its end, so that gzip's CRC-32 and length fields are
    verified: a stream that inflates but fails its CRC is rejected, never trained on.
    """
    gz = path.name.endswith(".gz")
    try:
        st, f = _open_nifti(path)
        file_size = st.st_size
        with f:
            head = f.read(540)
            header = _parse_header(path, head)
            shape, dtype = header.get_data_shape(), header.get_data_dtype()
            nvox = int(np.prod([int(v) for v in shape], dtype=np.float64))
            data_bytes = nvox * dtype.itemsize
            need = int(header.get_data_offset()) + data_bytes
            if gz:
                # the gzip trailer's ISIZE: the inflated length modulo 2^32 (single-member files)
                with open(path, "rb") as raw:
                    raw.seek(max(0, file_size - 4))
                    isize = int.from_bytes(raw.read(4), "little")
                if need < 2**32 and isize < need:
                    raise InputError(path, f"header claims {shape} {dtype} voxels ({need} bytes) but the "
                                           f"file holds {isize} bytes: truncated or corrupt")
            elif file_size < need:
                raise InputError(path, f"header claims {shape} {dtype} voxels ({need} bytes) but the "
                                       f"file has {file_size} bytes: truncated or corrupt")
            # the raw bytes, the array, and its float32 copy
            check_memory(path, need + nvox * (dtype.itemsize + 4), f"reading {tuple(shape)} voxels")
            body = f.read(need - len(head)) if need > len(head) else b""
            if len(head) + len(body) < need:
                raise InputError(path, f"truncated: {len(head) + len(body)} of the {need} bytes the header "
                                       f"claims")
            if gz:  # inflate to the end: GzipFile checks the CRC-32 and length there
                extra = 0
                while chunk := f.read(2**20):
                    extra += len(chunk)
                    if extra > _MAX_TRAILING_BYTES:
                        raise InputError(path, "more data after the voxels than the header describes: "
                                               "corrupt file")
        blob = head + body  # the whole header block even when the data end inside it
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = klass.from_bytes(blob)
        _check_geometry(path, img)
        data = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(path, f"corrupt or truncated gzip data ({exc})") from None
    except nib.filebasedimages.ImageFileError:
        raise InputError(path, "not a NIfTI file (no valid NIfTI header)") from None
    except MemoryError:
        raise InputError(path, "not enough memory to read it") from None
    except Exception as exc:  # nibabel raises many kinds (WrapStructError, HeaderDataError, ...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "gzip" in msg.lower() or "compressed" in msg.lower() or "crc" in msg.lower():
            raise InputError(path, f"corrupt or truncated gzip data ({msg})") from None
        raise InputError(path, f"unreadable NIfTI file ({type(exc).__name__}: {msg})") from None
    return data, img


def _check_geometry(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a degenerate voxel-to-world affine: non-finite, a voxel size outside
    :data:`VOXEL_MM_RANGE` along any axis, or (nearly) parallel voxel axes."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputError(path, "NIfTI header gives a degenerate voxel-to-world affine (non-finite entries)")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = VOXEL_MM_RANGE
    for axis, size in enumerate(sizes):
        if not lo * (1 - 1e-6) <= size <= hi * (1 + 1e-6):  # float32 header fields round
            raise InputError(path, f"NIfTI header gives a degenerate voxel size of {size:.3g} mm along axis "
                                   f"{axis} (accepted: {lo:g} to {hi:g} mm)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(sizes)):
        raise InputError(path, "NIfTI header gives a degenerate voxel-to-world affine (its voxel axes are "
                               "parallel)")


def _check_pixdim(path: Path, raw: nib.Nifti1Header) -> None:
    """Refuse a non-finite ``pixdim`` of a grid axis, or (where the affine is built from
    ``pixdim``: no sform) a zero or negative one, which nibabel would silently take for 1 mm or
    its absolute value; and a non-finite or negative time step of a 3D + t image. ``raw``: the
    header as stored (nibabel's checked header has such values already "fixed")."""
    shape = [int(v) for v in raw.get_data_shape()]
    nd = _squeezed_ndim(shape)
    pixdim = [float(v) for v in raw["pixdim"][1:1 + len(shape)]]
    from_pixdim = int(raw["sform_code"]) == 0  # the affine is the qform's, or pixdim's own
    for axis in range(min(nd, 3, len(pixdim))):
        v = pixdim[axis]
        if not math.isfinite(v) or (from_pixdim and v <= 0):
            raise InputError(path, f"NIfTI header gives a degenerate voxel size (pixdim[{axis + 1}] = {v:g})")
    if nd == 4 and len(pixdim) > 3 and not (math.isfinite(pixdim[3]) and pixdim[3] >= 0):
        raise InputError(path, f"NIfTI header gives a degenerate time step (pixdim[4] = {pixdim[3]:g})")


def _squeezed_ndim(shape: Sequence[int]) -> int:
    """Grid axes of a file of ``shape``: trailing singleton axes dropped, down to 2."""
    squeezed = list(shape)
    while len(squeezed) > 2 and squeezed[-1] == 1:
        squeezed.pop()
    return len(squeezed)


def grid_shape_of(path: str | Path, expect_ndim: int | None = None) -> tuple[int, ...]:
    """The grid shape ``S`` of a NIfTI file from its header alone (cheap: no voxel is read), with
    the checks of :func:`load_image` on the file's kind and dimensionality (NRRD, MetaImage and
    DICOM series folders: :func:`inrseg.data.sitk_io.grid_shape_sitk`)."""
    path = Path(path)
    if _via_sitk(path):
        shape = grid_shape_sitk(path)
        return shape[:_grid_ndim(path, shape, expect_ndim)]
    try:
        with _nibabel_quiet(), _open_nifti(path)[1] as f:
            header = _parse_header(path, f.read(540))
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(path, f"corrupt or truncated gzip data ({exc})") from None
    shape = tuple(int(v) for v in header.get_data_shape())
    return shape[:_grid_ndim(path, shape, expect_ndim)]


def _grid_ndim(path: Path, shape: tuple[int, ...], expect_ndim: int | None) -> int:
    """Number of grid axes of a file of ``shape``; checks it against ``expect_ndim``.

    ``H x W x 1`` (and ``H x W``) count as 2D; ``X x Y x Z x 1`` as 3D.
    """
    nd = _squeezed_ndim(shape)
    if nd < 2 or nd > 4:
        raise InputError(path, f"has shape {shape}: expected a 2D (H x W x 1), 3D or 3D+t image")
    if expect_ndim is not None and nd != expect_ndim:
        names = {2: "2D (H x W x 1)", 3: "3D", 4: "4D (3D + time)"}
        raise InputError(path, f"is {names.get(nd, f'{nd}D')} with shape {shape}, "
                               f"expected {names.get(expect_ndim, f'{expect_ndim}D')}")
    return nd


def _check_finite(path: Path, data: np.ndarray, stored: np.ndarray | None = None) -> None:
    """Refuse NaN / Inf voxels in ``data``; ``stored``: the values as read (float64, say) of
    which ``data`` is the float32 copy, so that values beyond float32's range are named as such."""
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            if stored is not None and stored.dtype != data.dtype and np.isfinite(stored[bad]).any():
                top = float(np.max(np.abs(stored[bad][np.isfinite(stored[bad])])))
                raise InputError(path, f"holds values up to {top:.3g}, beyond float32's range "
                                       f"({_FLOAT32_MAX:.3g}) that inrseg computes in: rescale the image")
            raise InputError(path, f"contains {int(bad.sum())} NaN/Inf voxels")


def load_image(paths: str | Path | Sequence[str | Path], expect_ndim: int | None = None) -> Volume:
    """Read an image, one NIfTI file per channel, into a ``(C, *S)`` float32 :class:`Volume`.

    Args:
        paths: one file, or one file per channel (nnU-Net ``_0000``, ``_0001``, ...); a NRRD /
            MetaImage file or a DICOM series folder is read through :mod:`inrseg.data.sitk_io`.
        expect_ndim: required number of grid axes (2, 3 or 4); ``None`` accepts 2-4.

    Raises:
        InputError: missing / corrupt / non-NIfTI file, NaN or Inf voxels, wrong dimensionality,
            channels whose shapes or affines differ.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError(None, "no image files given")
    channels: list[np.ndarray] = []
    first: nib.Nifti1Image | None = None
    nd = None
    for p in paths:
        stored, img = _read(p)
        nd_p = _grid_ndim(p, stored.shape, expect_ndim)
        # H x W x 1 -> H x W; X x Y x Z x 1 -> X x Y x Z
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(stored, dtype=np.float32).reshape(stored.shape[:nd_p])
        _check_finite(p, data, np.asarray(stored).reshape(data.shape))
        if first is None:
            first, nd = img, nd_p
        else:
            if data.shape != channels[0].shape:
                raise InputError(p, f"channel shape {data.shape} differs from {paths[0].name} "
                                    f"{channels[0].shape}")
            if not np.allclose(img.affine, first.affine, atol=1e-3):
                raise InputError(p, f"channel affine differs from {paths[0].name}")
        channels.append(data)
    assert first is not None and nd is not None
    if all(ch.size and ch.min() == ch.max() for ch in channels):
        raise InputError(paths[0], f"image is constant (every voxel is {float(channels[0].flat[0]):g}): "
                                   f"there is nothing to segment")
    zooms = first.header.get_zooms()
    return Volume(data=np.stack(channels, 0), affine=np.asarray(first.affine, dtype=np.float64),
                  spatial_ndim=nd, time_step=float(zooms[3]) if nd == 4 and len(zooms) > 3 else None,
                  dtype=first.get_data_dtype(), path=paths[0])


def load_labels(path: str | Path, expect_ndim: int | None = None,
                allowed: Sequence[int] | None = None, ignore_label: int | None = None) -> Volume:
    """Read a label map as an integer ``(*S,)`` :class:`Volume`.

    Args:
        path: the NIfTI label file.
        expect_ndim: required number of grid axes; ``None`` accepts 2-4.
        allowed: the label values permitted (e.g. those of ``dataset.json``); ``None`` = any.
        ignore_label: the value marking voxels without a label (``dataset.json`` ``"ignore"``);
            it is accepted on top of ``allowed`` and recorded as ``meta["ignore_label"]``.
            The data keep the value as stored; :func:`~inrseg.data.volume.label_array` maps it to
            :data:`~inrseg.data.volume.IGNORE`.

    Raises:
        InputError: unreadable file, non-integer values, values outside ``allowed``.
    """
    path = Path(path)
    data, img = _read(path)
    nd = _grid_ndim(path, data.shape, expect_ndim)
    data = np.asarray(data).reshape(data.shape[:nd])
    if np.issubdtype(data.dtype, np.floating):
        _check_finite(path, data)
        rounded = np.rint(data)
        if np.abs(data - rounded).max(initial=0.0) > 1e-3:
            raise InputError(path, "label map holds non-integer values")
        data = rounded
    if data.size and data.min() < 0:
        raise InputError(path, f"label map holds negative value {int(data.min())}")
    if data.size and data.max() > MAX_LABEL_VALUE:
        raise InputError(path, f"label map holds value {float(data.max()):.6g}, larger than any label value "
                               f"(at most {MAX_LABEL_VALUE})")
    data = data.astype(np.int64)
    if allowed is not None:
        present = np.unique(data)
        ok = set(int(a) for a in allowed) | ({int(ignore_label)} if ignore_label is not None else set())
        extra = sorted(set(present.tolist()) - ok)
        if extra:
            names = f"{sorted(int(a) for a in allowed)}"
            if ignore_label is not None:
                names += f" (ignore label {int(ignore_label)})"
            raise InputError(path, f"label values {extra} are not in the dataset's labels {names}")
    zooms = img.header.get_zooms()
    meta = {} if ignore_label is None else {"ignore_label": int(ignore_label)}
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), spatial_ndim=nd,
                  time_step=float(zooms[3]) if nd == 4 and len(zooms) > 3 else None,
                  dtype=img.get_data_dtype(), path=path, meta=meta)



def _to_file_array(data: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """Grid array -> array as stored: 2D slices get their trailing singleton axis back."""
    return data[..., None] if spatial_ndim == 2 else data


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype, time_step: float | None,
          header: nib.Nifti1Header | None = None) -> None:
    img = nib.Nifti1Image(array, affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    if time_step is not None and array.ndim == 4:
        zooms = list(img.header.get_zooms())
        zooms[3] = time_step
        img.header.set_zooms(zooms)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def save_labels(labels: np.ndarray, path: str | Path, like: Volume) -> Path:
    """Write a label map ``(*S,)`` onto the grid of ``like`` (its affine, 2D-ness, time step).

    ``like`` may be a :class:`Volume` on a different grid than ``labels`` only if the caller has
    already set a matching affine (see :func:`inrseg.data.grids.resampled_affine`). Values are
    stored as uint8 when they fit, else int16. Atomic.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the reference grid {like.shape}")
    dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.int16
    _save(_to_file_array(labels.astype(dtype), like.spatial_ndim), like.affine, path, dtype,
          like.time_step)
    return path


def save_image(image: Volume | np.ndarray, path: str | Path, like: Volume | None = None,
               affine: np.ndarray | None = None, spatial_ndim: int | None = None,
               dtype=np.float32) -> Path:
    """Write a single-channel image ``(*S,)`` or ``(1, *S)`` to NIfTI. Atomic.

    Args:
        image: a :class:`Volume` (its affine, dtype and time step are kept) or an array.
        like: reference volume giving the affine when ``image`` is an array.
        affine: explicit affine when neither ``image`` nor ``like`` carries one (default identity).
        spatial_ndim: grid axes of an array without ``like`` (default ``image.ndim``; 2 writes
            an ``H x W x 1`` file).
        dtype: on-disk type when ``image`` is an array; integer types get a scale slope.
    """
    if isinstance(image, Volume):
        like, data = image, image.data
        dtype = image.dtype if image.dtype is not None else dtype
    else:
        data = np.asarray(image)
    if like is not None:
        affine, nd, ts = like.affine, like.spatial_ndim, like.time_step
    else:
        affine = np.eye(4) if affine is None else affine
        nd, ts = (spatial_ndim or data.ndim), None
    if data.ndim == nd + 1:
        if data.shape[0] != 1:
            raise ValueError("save_image writes one channel at a time")
        data = data[0]
    _save(_to_file_array(np.asarray(data, dtype=np.float32), nd), affine, Path(path), dtype, ts)
    return Path(path)
