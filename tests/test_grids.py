"""Coordinate grids: range, any resolution, physical aspect, and affine consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrseg.data.grids import (coordinate_grid, coords_to_voxel, resampled_affine, resampled_shape,
                               voxel_to_coords, world_to_coords)


def test_grid_is_cell_centred_in_minus_one_one():
    g = coordinate_grid((4, 3))
    assert g.shape == (12, 2)
    assert g[:, 0].unique().tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    assert g.abs().max() < 1


def test_2x_grid_subdivides_voxels():
    g1 = coordinate_grid((5, 4), flatten=False)
    g2 = coordinate_grid((5, 4), scale=2, flatten=False)
    assert g2.shape == (10, 8, 2)
    # the mean of each 2x2 block of the fine grid is the coarse voxel centre
    blocks = g2.reshape(5, 2, 4, 2, 2).mean(dim=(1, 3))
    torch.testing.assert_close(blocks, g1)
    assert resampled_shape((5, 4, 3), (2, 2, 1)) == (10, 8, 3)


def test_keep_aspect_preserves_millimetres():
    shape, spacing = (96, 96, 10), (1.8, 1.8, 8.0)
    g = coordinate_grid(shape, spacing, keep_aspect=True, flatten=False)
    step_xy = float(g[1, 0, 0, 0] - g[0, 0, 0, 0])
    step_z = float(g[0, 0, 1, 2] - g[0, 0, 0, 2])
    assert step_z / step_xy == pytest.approx(8.0 / 1.8, rel=1e-5)
    assert g[..., 0].abs().max() < 1 and g[..., 2].abs().max() < 80 / 172.8 + 1e-6


def test_resampled_affine_maps_fine_voxels_to_same_world_points():
    aff = np.array([[0, -1.2, 0, 30], [2.0, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1.0]])
    shape, fine = (6, 8, 4), (12, 16, 8)
    fa = resampled_affine(aff, shape, fine)
    # fine voxel j sits at coarse index (j + 0.5) / 2 - 0.5
    j = np.array([3.0, 5.0, 1.0])
    coarse = (j + 0.5) / 2 - 0.5
    np.testing.assert_allclose(fa[:3, :3] @ j + fa[:3, 3], aff[:3, :3] @ coarse + aff[:3, 3])
    # and the coordinates of that fine voxel on the fine grid equal those of the world point
    world = (fa @ np.append(j, 1))[:3]
    c_fine = voxel_to_coords(torch.from_numpy(j[None]), fine)
    c_world = world_to_coords(world[None], aff, shape)
    torch.testing.assert_close(c_fine, c_world)


def test_voxel_coords_round_trip():
    idx = torch.tensor([[0.0, 3.5, 9.0], [2.0, 0.0, 1.25]])
    c = voxel_to_coords(idx, (10, 12, 14), (1.0, 1.0, 3.0), keep_aspect=True)
    torch.testing.assert_close(coords_to_voxel(c, (10, 12, 14), (1.0, 1.0, 3.0), keep_aspect=True), idx)
