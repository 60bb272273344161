"""Images, label maps, dataset layouts, coordinate grids and phantoms."""

from inrseg.data.grids import coordinate_grid, resampled_affine, voxel_to_coords, world_to_coords
from inrseg.data.io import Volume, load_image, load_labels, save_image, save_labels
from inrseg.data.layouts import Case, Dataset, open_dataset, split_by_subject, subject_of

__all__ = ["Case", "Dataset", "Volume", "coordinate_grid", "load_image", "load_labels", "open_dataset",
           "resampled_affine", "save_image", "save_labels", "split_by_subject", "subject_of",
           "voxel_to_coords", "world_to_coords"]
