"""Reading and writing NIfTI images and label maps (via nibabel), keeping affine, spacing and dtype.

Conventions
-----------
* A :class:`Volume` holds an image as ``(C, *S)`` float32 (channels first) or a label map as
  ``(*S,)`` integers, where ``S`` is the grid shape in the file's voxel order.
* ``H x W x 1`` files are 2D images: ``S = (H, W)``; they are written back as ``H x W x 1``.
* 4D files ``X x Y x Z x T`` (cine MRI) have ``S = (X, Y, Z, T)``; they are accepted only where
  a caller allows time (``expect_ndim=4``), otherwise "4D where 3D is expected" is an error.
* ``affine`` is the 4 x 4 voxel-index -> world (mm) matrix of the NIfTI header. A label map
  written by inrseg carries its source image's affine, so it overlays in 3D Slicer / ITK-SNAP.
* All writes are atomic: a temporary file in the target directory, renamed on success.

Every problem with a file raises :class:`~inrseg.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from inrseg.core.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: label of voxels without a label inside the trainers (a dataset's own ignore value, e.g.
#: 255, is mapped to it by :func:`label_array`); no loss or metric counts such a voxel
IGNORE = -1


@dataclass
class Volume:
    """An image or a label map on a voxel grid.

    Attributes:
        data: image ``(C, *S)`` float32, or label map ``(*S,)`` integer.
        affine: ``(4, 4)`` float64, voxel index -> world coordinates in mm.
        spatial_ndim: number of grid axes ``len(S)``: 2 (slice), 3 (volume) or 4 (3D + time).
        time_step: seconds (or the file's time unit) between frames for 4D data, else ``None``.
        dtype: the on-disk data type, reused when the volume is written back.
        path: the file it was read from (the first channel's for multi-channel images).
    """

    data: np.ndarray
    affine: np.ndarray
    spatial_ndim: int
    time_step: float | None = None
    dtype: np.dtype | None = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """Grid shape ``S`` (no channel axis)."""
        return tuple(self.data.shape[-self.spatial_ndim:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial grid axis (time excluded), from the affine."""
        n = min(self.spatial_ndim, 3)
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :n], axis=0))

    @property
    def is_label(self) -> bool:
        return self.data.ndim == self.spatial_ndim

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None) -> "Volume":
        """A copy carrying ``data`` (and optionally a new affine) with the same metadata."""
        grid_ndim = self.spatial_ndim
        return Volume(data=data, affine=self.affine.copy() if affine is None else affine,
                      spatial_ndim=grid_ndim, time_step=self.time_step, dtype=None, path=self.path,
                      meta=dict(self.meta))


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


def available_memory() -> int:
    """Bytes of memory this process may still allocate: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else the free physical pages; environment ``INRSEG_MAX_MEMORY_GB`` caps it."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 2**62
    cap = os.environ.get("INRSEG_MAX_MEMORY_GB")
    if cap:
        avail = min(avail, int(float(cap) * 2**30))
    return avail


def check_memory(path: Path | None, nbytes: float, what: str) -> None:
    """Raise :class:`InputError` if allocating ``nbytes`` for ``what`` would exceed
    :func:`available_memory` (checked before anything is allocated)."""
    avail = available_memory()
    if nbytes > avail:
        raise InputError(path, f"{what} needs {nbytes / 2**30:.1f} GiB of memory, only "
                               f"{avail / 2**30:.1f} GiB is available")


def _parse_header(path: Path, head: bytes) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` (at least 540 bytes if the file
    has them), checked for a sane shape and voxel type."""
    if len(head) < 348:
        raise InputError(path, f"not a NIfTI file (only {len(head)} bytes, a header needs 348)")
    import io
    import struct

    size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
    klass = nib.Nifti2Header if 540 in (size_le, size_be) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head), check=True)
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
    return header


@contextlib.contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Silence nibabel's logger while we read: it logs fix-ups and header problems to stderr
    itself ("data code ... not recognized"), around our one-line error, which already says what
    is wrong with the file."""
    import logging

    logger = logging.getLogger("nibabel")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file (see :func:`_read_file`) with nibabel's own logging silenced."""
    with _nibabel_quiet():
        return _read_file(path)


def _read_file(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file fully into memory (float32 via the header's scaling), with clear errors.

    Before anything large is allocated, the header's claimed data size is checked against the
    file (for ``.nii.gz``, against the gzip trailer's length field) and against the available
    memory. A ``.nii.gz`` is inflated to its end, so that gzip's CRC-32 and length fields are
    verified: a stream that inflates but fails its CRC is rejected, never trained on.
    """
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a NIfTI file")
    if not is_nifti(path):
        raise InputError(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    gz = path.name.endswith(".gz")
    try:
        file_size = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
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
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError(path, "NIfTI header gives a degenerate voxel-to-world affine (zero or "
                                   "non-finite voxel size)")
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


def _grid_ndim(path: Path, shape: tuple[int, ...], expect_ndim: int | None) -> int:
    """Number of grid axes of a file of ``shape``; checks it against ``expect_ndim``.

    ``H x W x 1`` (and ``H x W``) count as 2D; ``X x Y x Z x 1`` as 3D.
    """
    squeezed = list(shape)
    while len(squeezed) > 2 and squeezed[-1] == 1:
        squeezed.pop()
    nd = len(squeezed)
    if nd < 2 or nd > 4:
        raise InputError(path, f"has shape {shape}: expected a 2D (H x W x 1), 3D or 3D+t image")
    if expect_ndim is not None and nd != expect_ndim:
        names = {2: "2D (H x W x 1)", 3: "3D", 4: "4D (3D + time)"}
        raise InputError(path, f"is {names.get(nd, f'{nd}D')} with shape {shape}, "
                               f"expected {names.get(expect_ndim, f'{expect_ndim}D')}")
    return nd


def _check_finite(path: Path, data: np.ndarray) -> None:
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(path, f"contains {int(bad.sum())} NaN/Inf voxels")


def load_image(paths: str | Path | Sequence[str | Path], expect_ndim: int | None = None) -> Volume:
    """Read an image, one NIfTI file per channel, into a ``(C, *S)`` float32 :class:`Volume`.

    Args:
        paths: one file, or one file per channel (nnU-Net ``_0000``, ``_0001``, ...).
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
        data, img = _read(p)
        nd_p = _grid_ndim(p, data.shape, expect_ndim)
        # H x W x 1 -> H x W; X x Y x Z x 1 -> X x Y x Z
        data = np.asarray(data, dtype=np.float32).reshape(data.shape[:nd_p])
        _check_finite(p, data)
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
            The data keep the value as stored; :func:`label_array` maps it to :data:`IGNORE`.

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


def label_array(labels: Volume) -> np.ndarray:
    """The int64 label array of a label :class:`Volume` with its ignored voxels (value
    ``labels.meta["ignore_label"]``, if any) set to :data:`IGNORE` (-1): the form every trainer
    works with. A copy."""
    data = np.asarray(labels.data).astype(np.int64)
    ignore = labels.meta.get("ignore_label") if labels.meta else None
    if ignore is not None:
        data[data == int(ignore)] = IGNORE
    return data


def check_same_grid(image: Volume, labels: Volume, atol: float = 1e-3) -> None:
    """Raise :class:`InputError` (naming the label file) if the grids of image and labels differ."""
    if image.shape != labels.shape:
        raise InputError(labels.path, f"label shape {labels.shape} does not match image "
                                      f"{image.path.name if image.path else ''} shape {image.shape}")
    if not np.allclose(image.affine, labels.affine, atol=atol):
        raise InputError(labels.path, "label affine does not match image "
                                      f"{image.path.name if image.path else ''} affine")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_dir_public(path: Path) -> None:
    """Give a directory made by :func:`tempfile.mkdtemp` (mode 0700) the umask's mode."""
    os.chmod(path, 0o777 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix (``.nii.gz``, ``.json``...) so writers that choose the
    format from the extension behave. On error the temporary file is removed: nothing
    half-written is ever left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 (and some writers recreate the file): give it the umask's mode,
        # so colleagues can read results as with any other file
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        if exc.errno is not None and exc.filename in (None, str(tmp_path), tmp):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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


# --------------------------------------------------------------------------------------------
# Output folders written whole, locks against concurrent writers, stale temporary files
# --------------------------------------------------------------------------------------------

def check_writable(path: str | Path, what: str = "output") -> None:
    """Raise :class:`InputError` unless ``path``'s nearest existing ancestor directory is
    writable: called before training, so a bad ``--out`` is found in seconds, not hours."""
    path = Path(path).absolute()
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(path, f"cannot write the {what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot write the {what}: {probe} is not writable")


def stale_temporaries(path: str | Path) -> list[Path]:
    """Hidden temporary siblings ``.NAME.*.tmp*`` that :func:`atomic_path` / :func:`atomic_dir`
    left behind for ``path`` when a process was killed mid-write."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*") if ".tmp" in p.name[len(path.name) + 2:])


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``path`` (call it holding :func:`exclusive_lock`, so
    that no live writer's file is taken); returns what was removed, for the caller to report."""
    import shutil

    removed = stale_temporaries(path)
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[Path]:
    """Hold ``PATH.lock`` (an advisory ``flock``, released by the kernel even on SIGKILL) for the
    block; a second inrseg process writing ``path`` fails at once with :class:`InputError`."""
    import fcntl

    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(path, "another inrseg process is writing it (wait for it to finish)") from None
        yield lock
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; when the block succeeds it becomes
    ``path`` in one rename, so ``path`` is either written whole or left as it was.

    ``path`` must not exist or be empty, unless ``force`` (then it is replaced). The check runs
    before the block (fail early) and again at the rename (another writer may have finished
    meanwhile: its folder is never mixed with ours).
    """
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(path, "exists and is not empty (use --force to replace it)")
    check_writable(path, "output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    make_dir_public(tmp)
    try:
        yield tmp
        old = None
        if path.is_dir():
            if any(path.iterdir()):
                if not force:
                    raise InputError(path, "was written by another process meanwhile; nothing was changed")
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.tmp", dir=path.parent))
                os.replace(path, old / "x")
            else:
                path.rmdir()
        try:
            os.rename(tmp, path)
        except OSError:
            raise InputError(path, "was written by another process meanwhile; nothing was changed") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
