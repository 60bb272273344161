"""DICOM SEG output (``inrseg segment --output-format dicom-seg``) through highdicom.

highdicom (and pydicom) are an optional extra, ``pip install 'inrseg[dicom]'``: they are
imported inside the functions here, and :func:`require_highdicom` says in one line what to
install. A label map predicted on a DICOM series' own grid (:mod:`inrseg.data.sitk_io` reads the
series) becomes one DICOM Segmentation object:

* it references the source series (its SeriesInstanceUID, and every slice's SOPInstanceUID)
  and takes the study, patient and frame of reference of the source;
* segment ``k`` (``k = 1 .. K-1``) holds the voxels of label ``k``, labelled with the model's
  label name ``label_names[k]``; the background (label 0) is no segment. The model knows names,
  not anatomy codes: every segment has the generic category "Anatomical Structure" and type
  "Tissue" (SNOMED CT), algorithm type AUTOMATIC;
* frame ``z`` of the SEG covers slice ``z`` of the series in GDCM's slice order, its rows and
  columns the slice's: label ``[x, y, z]`` (inrseg's voxel order) is pixel ``(row y, column x)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from inrseg import __version__
from inrseg.core.errors import InputError
from inrseg.core.files import atomic_path
from inrseg.data.sitk_io import dicom_series
from inrseg.data.volume import Volume

__all__ = ["SEG_SUFFIX", "require_highdicom", "write_dicom_seg"]

#: the file ending of a DICOM SEG written by inrseg (OUTPUT/<case>.dcm)
SEG_SUFFIX = ".dcm"
#: DICOM's longest segment label (VR LO: 64 characters)
_MAX_LABEL = 64


def require_highdicom() -> None:
    """Raise a one-line :class:`InputError` naming the extra to install if highdicom is missing."""
    try:
        import highdicom  # noqa: F401  (optional: only DICOM SEG output needs it)
    except ImportError:
        raise InputError(None, "--output-format dicom-seg needs highdicom, which is not installed: "
                               "pip install 'inrseg[dicom]'") from None


def write_dicom_seg(labels: Volume, series_folder: str | Path, path: str | Path, label_names: Sequence[str],
                    algorithm: str = "inrseg") -> Path:
    """Write the label map ``labels`` (``(X, Y, Z)`` on the grid of the DICOM series in
    ``series_folder``: columns, rows, slices) as a DICOM SEG at ``path``, atomically.

    Args:
        labels: integer labels ``0 .. len(label_names) - 1`` on the series' own grid.
        series_folder: the folder of the source series (one series, as
            :func:`inrseg.data.sitk_io.dicom_series` requires).
        label_names: the model's class names; ``label_names[k]`` names segment ``k``.
        algorithm: the algorithm's name recorded in the SEG (e.g. ``"inrseg unet"``).

    Raises:
        InputError: highdicom missing; a label map not on the series' grid; source slices that
            highdicom cannot build a SEG from (named by the series folder).
    """
    require_highdicom()
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    folder, path = Path(series_folder), Path(path)
    _, files = dicom_series(folder)
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:  # pydicom raises several kinds for a broken file
        raise InputError(folder, f"unreadable DICOM slice ({type(exc).__name__}: {exc})") from None
    grid = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    data = np.asarray(labels.data)
    if data.size != int(np.prod(grid)) or data.shape[:2] != grid[:2]:
        raise InputError(folder, f"label map of shape {data.shape} is not on the series' grid {grid} "
                                 f"(columns, rows, slices): DICOM SEG needs --scale 1")
    if data.size and (data.min() < 0 or data.max() >= len(label_names)):
        raise ValueError(f"labels outside 0..{len(label_names) - 1}")
    frames = data.reshape(grid).transpose(2, 1, 0)  # (slices, rows, columns), the sources' order
    frames = frames.astype(np.uint8 if len(label_names) <= 256 else np.uint16)
    family = codes.cid7162.ArtificialIntelligence
    ident = hd.AlgorithmIdentificationSequence(name=algorithm, version=__version__, family=family)
    segments = [hd.seg.SegmentDescription(segment_number=k, segment_label=str(name)[:_MAX_LABEL],
                                          segmented_property_category=codes.SCT.AnatomicalStructure,
                                          segmented_property_type=codes.SCT.Tissue,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                          algorithm_identification=ident)
                for k, name in enumerate(label_names) if k > 0]
    if not segments:
        raise InputError(folder, "the model has no foreground class to write as a DICOM SEG segment")
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="inrseg",
            manufacturer_model_name=algorithm[:_MAX_LABEL], software_versions=__version__,
            device_serial_number="0", series_description=f"{algorithm} segmentation"[:_MAX_LABEL])
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # what highdicom raises for such sources
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(folder, f"cannot build a DICOM SEG on this series ({msg})") from None
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
