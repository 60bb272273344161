"""Images, label maps, dataset layouts, coordinate grids and phantoms."""

from inrseg.data.cases import Case, Dataset
from inrseg.data.grids import coordinate_grid, resampled_affine, voxel_to_coords, world_to_coords
from inrseg.data.layouts import open_dataset
from inrseg.data.nifti import load_image, load_labels, save_image, save_labels
from inrseg.data.splits import split_by_subject, subject_of
from inrseg.data.volume import Volume

__all__ = ["Case", "Dataset", "Volume", "coordinate_grid", "load_image", "load_labels", "open_dataset",
           "resampled_affine", "save_image", "save_labels", "split_by_subject", "subject_of",
           "voxel_to_coords", "world_to_coords"]
