"""Cases and datasets: what a layout reader returns (paths only; nothing is read until asked).

A :class:`Dataset` is a list of training and test :class:`Case` objects plus its label names and
channel names. A case may carry an *ignore* value, the label of its unannotated voxels (see
:mod:`inrseg.data.layouts`); label validation accepts it and
:func:`~inrseg.data.volume.label_array` maps it to :data:`~inrseg.data.volume.IGNORE` for the
trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inrseg.core.errors import InputError
from inrseg.data.nifti import grid_shape_of, load_image, load_labels
from inrseg.data.volume import Volume, check_same_grid

__all__ = ["Case", "Dataset"]


@dataclass(frozen=True)
class Case:
    """One image (all channels) and, when known, its label map. Paths only.

    Attributes:
        case_id: e.g. ``sub01_cor+00``.
        subject_id: the subject the case belongs to (the split unit).
        image_paths: one NIfTI file per channel, in channel order.
        label_path: the label map, or ``None`` for unlabelled cases.
        spatial_ndim: expected grid axes (2, 3 or 4), or ``None`` to accept what is found.
        label_values: the values a label map may hold (from ``dataset.json``), or ``None``.
        ignore_label: the value of unlabelled voxels (``dataset.json`` ``"ignore"``), or ``None``.
    """

    case_id: str
    subject_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None = None
    spatial_ndim: int | None = None
    label_values: tuple[int, ...] | None = None
    ignore_label: int | None = None

    def grid_shape(self) -> tuple[int, ...]:
        """The grid shape ``S`` of the image, from its first file's header alone."""
        return grid_shape_of(self.image_paths[0], self.spatial_ndim)

    def load_image(self) -> Volume:
        """The image as a ``(C, *S)`` float32 :class:`Volume`."""
        return load_image(self.image_paths, expect_ndim=self.spatial_ndim)

    def load_labels(self) -> Volume:
        """The label map as an integer ``(*S,)`` :class:`Volume` (values as stored; the ignore
        value, if any, in ``meta["ignore_label"]``)."""
        if self.label_path is None:
            raise InputError(self.image_paths[0], f"case {self.case_id} has no label map")
        return load_labels(self.label_path, expect_ndim=self.spatial_ndim, allowed=self.label_values,
                           ignore_label=self.ignore_label)

    def load(self) -> tuple[Volume, Volume | None]:
        """Image and label map (``None`` if unlabelled), checked to share one grid."""
        image = self.load_image()
        if self.label_path is None:
            return image, None
        labels = self.load_labels()
        check_same_grid(image, labels)
        return image, labels


@dataclass
class Dataset:
    """A labelled dataset: training and test cases, label and channel names.

    Attributes:
        root: the dataset directory.
        name: dataset name.
        layout: ``"nnunet"``, ``"oasis"`` or ``"ukbb"``.
        label_names: class names indexed by label value (``label_names[0]`` is background).
        channel_names: image channel names in channel order.
        train: training cases (``imagesTr`` / all subjects when no test split exists).
        test: held-out test cases (``imagesTs``), possibly empty.
        spatial_ndim: grid axes of every case (2, 3 or 4).
        ignore_label: the value of unlabelled voxels, or ``None`` (see the module doc).
        subject_rule: ``"60 subjects: case id up to the first underscore"`` and the like
            (:func:`inrseg.data.splits.assign_subjects`).
    """

    root: Path
    name: str
    layout: str
    label_names: list[str]
    channel_names: list[str]
    train: list[Case]
    test: list[Case] = field(default_factory=list)
    spatial_ndim: int | None = None
    ignore_label: int | None = None
    subject_rule: str = ""  # how cases were grouped into subjects, as the line commands print

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.label_names)

    def info(self) -> dict:
        """A JSON-friendly summary: name, layout, root, labels, channels, case and subject counts."""
        out = {"name": self.name, "layout": self.layout, "root": str(self.root),
               "labels": self.label_names, "channels": self.channel_names,
               "spatial_ndim": self.spatial_ndim, "n_train": len(self.train),
               "n_test": len(self.test),
               "n_train_subjects": len({c.subject_id for c in self.train}),
               "n_test_subjects": len({c.subject_id for c in self.test}),
               "subject_rule": self.subject_rule}
        if self.ignore_label is not None:
            out["ignore_label"] = self.ignore_label
        return out
