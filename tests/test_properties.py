"""Property-based tests (hypothesis) and reference checks for the numerical building blocks:
intensity normalisation, training augmentation bounds, coordinate grids and affines under
``--scale``, and the segmentation metrics (bounds, symmetry, label permutation, brute force).

Each guards a behaviour whose silent breakage the rest of the suite would not notice: a z-score
over all voxels instead of the foreground, an augmentation 30x too strong, an affine off by half
a voxel at ``--scale 2``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inrseg.data.grids import (coordinate_grid, coords_to_voxel, resampled_affine, resampled_shape,
                               voxel_to_coords)
from inrseg.data.preprocess import normalize
from inrseg.data.sampling import AUG_SCALE, AUG_SHIFT, PatchSampler
from inrseg.metrics import case_metrics

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ normalisation
def test_zscore_uses_the_foreground_statistics():
    """nnU-Net's MRI scheme: mean and sd over the non-zero voxels, every voxel mapped with them."""
    x = np.zeros((1, 10, 10), np.float32)
    fg = np.arange(1, 51, dtype=np.float32).reshape(5, 10)
    x[0, :5] = fg
    out = normalize(x, "zscore")
    mu, sd = fg.mean(), fg.std()
    np.testing.assert_allclose(out[0, :5], (fg - mu) / sd, rtol=1e-5)
    np.testing.assert_allclose(out[0, 5:], -mu / sd, rtol=1e-5)       # background mapped, not zeroed
    assert abs(out[0, :5].mean()) < 1e-5 and abs(out[0, :5].std() - 1) < 1e-5
    assert abs(out.mean()) > 0.5     # a z-score over all voxels would give mean 0 here


def test_minmax_maps_the_percentiles_and_channels_independently():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=(20, 30)), 100 + 50 * rng.normal(size=(20, 30))]).astype(np.float32)
    out = normalize(x, "minmax")
    for c in range(2):
        lo, hi = np.percentile(x[c], [0.5, 99.5])
        np.testing.assert_allclose(out[c], np.clip((x[c] - lo) / (hi - lo), 0, 1), atol=1e-6)
    y = x.copy()
    y[1] *= 1000
    np.testing.assert_array_equal(normalize(y, "minmax")[0], out[0])


@SETTINGS
@given(hnp.arrays(np.float32, (1, 6, 7), elements=st.floats(-1e3, 1e3, width=32)),
       st.floats(0.01, 100), st.floats(-100, 100))
def test_minmax_is_invariant_to_positive_affine_intensity_maps(x, a, b):
    if np.ptp(x) < 1e-2:
        return
    np.testing.assert_allclose(normalize(a * x + b, "minmax"), normalize(x, "minmax"), atol=2e-3)


@SETTINGS
@given(hnp.arrays(np.float32, (1, 6, 7), elements=st.floats(0.5, 1e3, width=32)), st.floats(0.01, 100))
def test_zscore_is_invariant_to_intensity_scaling(x, a):
    if np.std(x) < 1e-2:
        return
    np.testing.assert_allclose(normalize(a * x, "zscore"), normalize(x, "zscore"), atol=2e-3)


# ------------------------------------------------------------------------------ augmentation
def test_training_augmentation_stays_within_its_bounds():
    """The crop of a known image, augmented: y = x (1 + f) + o with |f| <= 0.1 and |o| <= 0.1,
    and the draws cover most of that range (augmentation neither too strong nor off)."""
    x = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8) / 64
    lab = torch.zeros(8, 8, dtype=torch.int64)
    lab[2:5, 2:5] = 1
    sampler = PatchSampler([x], [lab], (8, 8), foreground_fraction=0.5, augment=True, seed=0)
    fs, os_ = [], []
    for step in range(300):
        y, _ = sampler.item(step, 0)
        scale = float((y[0, 0, 1] - y[0, 0, 0]) / (x[0, 0, 1] - x[0, 0, 0]))
        torch.testing.assert_close(y, x * scale + (y[0, 0, 0] - x[0, 0, 0] * scale), atol=1e-5, rtol=0)
        fs.append(scale - 1)
        os_.append(float(y[0, 0, 0] - x[0, 0, 0] * scale))
    assert max(map(abs, fs)) <= AUG_SCALE + 1e-5 and max(map(abs, os_)) <= AUG_SHIFT + 1e-5
    assert min(fs) < -0.8 * AUG_SCALE and max(fs) > 0.8 * AUG_SCALE
    assert min(os_) < -0.8 * AUG_SHIFT and max(os_) > 0.8 * AUG_SHIFT
    assert AUG_SCALE <= 0.2 and AUG_SHIFT <= 0.2  # the documented +-0.1, not an order more


@pytest.mark.parametrize("shape", [(8, 6), (6, 5, 4)])
def test_training_mirroring_flips_image_and_labels_together(shape):
    """With ``mirror``, each crop is the image mirrored along a random subset of its axes, its
    labels mirrored the same way; every subset is drawn (about equally often); without it, none."""
    d = len(shape)
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)
    lab = torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape) % 3
    import itertools
    subsets = [a for r in range(d + 1) for a in itertools.combinations(range(d), r)]
    for mirror in (True, False):
        sampler = PatchSampler([x], [lab], shape, augment=False, seed=1, mirror=mirror)
        seen = {a: 0 for a in subsets}
        for step in range(40 * len(subsets)):
            y, yl = sampler.item(step, 0)
            match = [a for a in subsets if torch.equal(y, torch.flip(x, [1 + i for i in a]))]
            assert len(match) == 1, "a crop must be the image mirrored along some axes"
            assert torch.equal(yl[0], torch.flip(lab, list(match[0]))), "labels mirrored as the image"
            seen[match[0]] += 1
        if mirror:
            assert min(seen.values()) > 0.4 * 40, seen
        else:
            assert seen[()] == 40 * len(subsets)


# ------------------------------------------------------------------------------ grids, --scale
shapes = st.lists(st.integers(1, 40), min_size=2, max_size=3).map(tuple)
scales = st.floats(0.25, 4.0)


@SETTINGS
@given(shapes, scales)
def test_resampled_grid_keeps_the_field_of_view(shape, scale):
    """At any --scale, the new grid's voxel centres, mapped through the resampled affine, lie
    in the same world field of view, and its cell-centred coordinates agree with the old ones."""
    new = resampled_shape(shape, scale)
    assert all(m >= 1 and (abs(m - n * scale) <= 0.5 + 1e-9 or m == 1) for n, m in zip(shape, new))
    affine = np.diag([1.3, 0.7, 2.1, 1.0])
    affine[:3, 3] = [5.0, -3.0, 11.0]
    a2 = resampled_affine(affine, shape, new)
    k = len(shape)
    for axis in range(k):
        n, m = shape[axis], new[axis]
        for j in (0, m - 1):           # first and last new voxel: at old index (j + 0.5) n / m - 0.5
            new_index = np.zeros(k)
            new_index[axis] = j
            old_index = (new_index + 0.5) * np.asarray(shape) / np.asarray(new) - 0.5
            e = np.r_[new_index, np.zeros(3 - k), 1.0]
            e_old = np.r_[old_index, np.zeros(3 - k), 1.0]
            np.testing.assert_allclose(a2 @ e, affine @ e_old, atol=1e-9)
        # in INR coordinates the same world point has the same coordinate on both grids
        old_c = voxel_to_coords(torch.tensor([[(m - 1 + 0.5) * n / m - 0.5]]), (n,))
        new_c = voxel_to_coords(torch.tensor([[float(m - 1)]]), (m,))
        torch.testing.assert_close(old_c, new_c, atol=1e-5, rtol=0)


@SETTINGS
@given(shapes, st.booleans(), st.lists(st.floats(0.3, 9.0), min_size=3, max_size=3))
def test_coordinates_round_trip_and_stay_in_range(shape, keep_aspect, spacing):
    grid = coordinate_grid(shape, spacing[:len(shape)], keep_aspect, device="cpu")
    assert grid.shape == (int(np.prod(shape)), len(shape))
    assert float(grid.abs().max()) < 1.0 + 1e-6
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"),
                      -1).reshape(-1, len(shape))
    torch.testing.assert_close(coords_to_voxel(grid, shape, spacing[:len(shape)], keep_aspect), idx,
                               atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ metrics
label_maps = hnp.arrays(np.int64, st.tuples(st.integers(3, 9), st.integers(3, 9)), elements=st.integers(0, 3))


def _brute_dice(pred, gt, c):
    p, g = pred == c, gt == c
    if p.sum() + g.sum() == 0:
        return np.nan
    return 2 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


@SETTINGS
@given(label_maps, st.data())
def test_metrics_bounds_symmetry_and_brute_force(gt, data):
    pred = data.draw(hnp.arrays(np.int64, gt.shape, elements=st.integers(0, 3)))
    m = case_metrics(pred, gt, 4, distances=False)
    r = case_metrics(gt, pred, 4, distances=False)
    for c in range(4):
        ref = _brute_dice(pred, gt, c)
        if np.isnan(ref):
            assert np.isnan(m.dice[c])
        else:
            assert m.dice[c] == pytest.approx(ref)
            assert 0 <= m.jaccard[c] <= m.dice[c] <= 1
            assert m.jaccard[c] == pytest.approx(m.dice[c] / (2 - m.dice[c]))
    np.testing.assert_allclose(m.dice, r.dice, equal_nan=True)          # Dice is symmetric
    perfect = case_metrics(gt, gt, 4, distances=False)
    present = [c for c in range(4) if (gt == c).any()]
    np.testing.assert_allclose(perfect.dice[present], 1.0)


@SETTINGS
@given(label_maps, st.data(), st.permutations([1, 2, 3]))
def test_metrics_follow_a_permutation_of_the_labels(gt, data, perm):
    pred = data.draw(hnp.arrays(np.int64, gt.shape, elements=st.integers(0, 3)))
    lut = np.array([0, *perm])
    m = case_metrics(pred, gt, 4, distances=False)
    p = case_metrics(lut[pred], lut[gt], 4, distances=False)
    for c in range(1, 4):
        np.testing.assert_allclose(p.dice[lut[c]], m.dice[c], equal_nan=True)
    assert p.mean_foreground_dice == pytest.approx(m.mean_foreground_dice, nan_ok=True)


@SETTINGS
@given(label_maps, st.data())
def test_ignored_voxels_do_not_count(gt, data):
    pred = data.draw(hnp.arrays(np.int64, gt.shape, elements=st.integers(0, 3)))
    mask = data.draw(hnp.arrays(np.bool_, gt.shape))
    with_ignore = np.where(mask, 255, gt)
    m = case_metrics(pred, with_ignore, 4, distances=False, ignore_label=255)
    keep = ~mask
    for c in range(1, 4):
        ref = _brute_dice(pred[keep], gt[keep], c) if keep.any() else np.nan
        np.testing.assert_allclose(m.dice[c], ref, equal_nan=True)
