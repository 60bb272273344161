"""Tests for inrseg.metrics: hand-computed values and an independent brute-force surface distance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from inrseg.metrics import CaseMetrics, case_metrics, image_diagonal_mm, summarize


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    assert not rec, [str(w.message) for w in rec]
    return out


# ----------------------------------------------------------------------------- overlap


def test_identical_maps_are_perfect():
    gt = np.zeros((20, 24), dtype=np.int64)
    gt[2:8, 3:10] = 1
    gt[10:18, 12:20] = 2
    m = _no_warnings(case_metrics, gt.copy(), gt, num_classes=3, spacing=(1.5, 0.5))
    np.testing.assert_array_equal(m.dice, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(m.jaccard, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(m.hd95_mm, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(m.asd_mm, [0.0, 0.0, 0.0])
    assert m.generalized_dice == pytest.approx(1.0, abs=1e-7)
    assert m.mean_foreground_dice == 1.0


def test_square_shifted_by_three_columns():
    gt = np.zeros((20, 20), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[5:15, 3:13] = 1
    pred[5:15, 6:16] = 1  # overlap 10 x 7 = 70, union 130
    m = case_metrics(pred, gt, num_classes=2, distances=False)
    assert m.dice[1] == pytest.approx(0.7, rel=1e-6)
    assert m.jaccard[1] == pytest.approx(70 / 130, rel=1e-6)
    # background: |P0| = |G0| = 300, overlap 270
    assert m.dice[0] == pytest.approx(2 * 270 / 600, rel=1e-6)
    assert m.jaccard[0] == pytest.approx(270 / 330, rel=1e-6)
    assert m.mean_foreground_dice == pytest.approx(0.7, rel=1e-6)
    assert np.isnan(m.hd95_mm).all() and np.isnan(m.asd_mm).all()  # distances skipped


# ----------------------------------------------------------------------------- distances, hand-computed


def _line_pair(shape=(20, 30)):
    gt = np.zeros(shape, dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[5, 4:26] = 1
    pred[8, 4:26] = 1  # shifted by 3 rows
    return pred, gt


def test_line_shifted_three_rows_anisotropic_2d():
    pred, gt = _line_pair()
    m = _no_warnings(case_metrics, pred, gt, num_classes=2, spacing=(2.0, 1.0))  # rows are 2 mm
    assert m.hd95_mm[1] == 6.0
    assert m.asd_mm[1] == 6.0
    assert m.dice[1] == 0.0
    # Swapping the spacing (rows 1 mm) must give 3 mm: spacing[i] belongs to array axis i.
    m2 = case_metrics(pred, gt, num_classes=2, spacing=(1.0, 2.0))
    assert m2.hd95_mm[1] == 3.0
    assert m2.asd_mm[1] == 3.0


def test_slab_shifted_along_z_anisotropic_3d():
    # (X, Y, Z) = (6, 7, 14), z-spacing 3 mm; slabs two voxels thick, not touching x/y borders.
    gt = np.zeros((6, 7, 14), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[1:5, 1:6, 4:6] = 1  # z = 4, 5
    pred[1:5, 1:6, 7:9] = 1  # z = 7, 8  (shift by 3 slices)
    spacing = (0.8, 0.6, 3.0)
    m = _no_warnings(case_metrics, pred, gt, num_classes=2, spacing=spacing)
    # Every voxel of a 2-thick slab is a boundary voxel.  Nearest counterparts are straight along
    # z: pred z=7 -> gt z=5 (2 slices = 6 mm), pred z=8 -> 9 mm; gt z=5 -> 6 mm, gt z=4 -> 9 mm.
    # Half of each directed set is 6 mm, half 9 mm: 95th percentile 9 mm, mean 7.5 mm.
    assert m.hd95_mm[1] == pytest.approx(9.0, rel=1e-6)
    assert m.asd_mm[1] == pytest.approx(7.5, rel=1e-6)
    assert m.dice[1] == 0.0
    # Same geometry with z-spacing 1 mm -> 3 and 2.5.
    m1 = case_metrics(pred, gt, num_classes=2, spacing=(0.8, 0.6, 1.0))
    assert m1.hd95_mm[1] == pytest.approx(3.0, rel=1e-6)
    assert m1.asd_mm[1] == pytest.approx(2.5, rel=1e-6)


# ----------------------------------------------------------------------------- empty-class conventions


def test_empty_class_conventions_2d():
    shape, spacing = (12, 16), (2.0, 0.5)
    gt = np.zeros(shape, dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[2:6, 2:6] = 1
    pred[2:6, 2:6] = 1  # class 1 perfect
    pred[8:10, 8:12] = 2  # class 2 hallucinated (absent from GT)
    gt[8:11, 1:4] = 3  # class 3 missed (absent from prediction)
    # class 4 absent from both
    m = _no_warnings(case_metrics, pred, gt, num_classes=5, spacing=spacing)
    diag = math.sqrt((12 * 2.0) ** 2 + (16 * 0.5) ** 2)
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diag)

    assert m.dice[1] == 1.0 and m.hd95_mm[1] == 0.0 and m.asd_mm[1] == 0.0
    for c in (2, 3):  # exactly one empty -> 0 overlap, diagonal distance
        assert m.dice[c] == 0.0
        assert m.jaccard[c] == 0.0
        assert m.hd95_mm[c] == pytest.approx(diag)
        assert m.asd_mm[c] == pytest.approx(diag)
    # both empty -> NaN everywhere
    assert np.isnan(m.dice[4]) and np.isnan(m.jaccard[4])
    assert np.isnan(m.hd95_mm[4]) and np.isnan(m.asd_mm[4])
    assert m.mean_foreground_dice == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    np.testing.assert_array_equal(m.gt_present, [True, True, False, True, False])
    np.testing.assert_array_equal(m.pred_present, [True, True, True, False, False])
    assert all(np.isfinite(m.hd95_mm[:4])) and all(np.isfinite(m.asd_mm[:4]))


def test_empty_class_conventions_3d_diagonal():
    gt = np.zeros((5, 6, 7), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 1:3] = 1
    m = case_metrics(pred, gt, num_classes=2, spacing=(1.0, 2.0, 3.0))
    diag = math.sqrt(5**2 + 12**2 + 21**2)
    assert m.dice[1] == 0.0
    assert m.hd95_mm[1] == pytest.approx(diag) and m.asd_mm[1] == pytest.approx(diag)


def test_no_foreground_anywhere_gives_nan_mean_without_warning():
    gt = np.zeros((8, 8), dtype=np.int64)
    m = _no_warnings(case_metrics, gt, gt.copy(), num_classes=3)
    assert m.dice[0] == 1.0
    assert np.isnan(m.dice[1:]).all()
    assert math.isnan(m.mean_foreground_dice)
    assert m.generalized_dice == pytest.approx(1.0)


# ----------------------------------------------------------------------------- generalized Dice


def test_generalized_dice_hand_computed_with_class_absent_from_gt():
    gt = np.array(
        [
            [0, 0, 0, 0],
            [0, 1, 1, 0],
            [0, 1, 1, 0],
            [0, 0, 0, 2],
        ]
    )
    pred = np.array(
        [
            [0, 0, 0, 3],
            [0, 1, 1, 0],
            [0, 1, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    # |G| = (11, 4, 1, 0), |P| = (12, 3, 0, 1), |P & G| = (10, 3, 0, 0).
    # w = 1/|G| = (1/11, 1/4, 1, inf); the inf weight of class 3 becomes the largest finite one, 1.
    num = 2 * (10 / 11 + 3 / 4 + 0 + 0)
    den = (11 + 12) / 11 + (4 + 3) / 4 + (1 + 0) * 1 + (0 + 1) * 1
    expected = num / den
    m = case_metrics(pred, gt, num_classes=4, distances=False)
    assert m.generalized_dice == pytest.approx(expected, rel=1e-6)
    # Dropping class 3 would give a different (higher) value: the hallucination is penalised.
    assert expected < num / (den - 1)
    # A fifth class absent from both maps has no influence.
    m5 = case_metrics(pred, gt, num_classes=5, distances=False)
    assert m5.generalized_dice == pytest.approx(expected, rel=1e-6)
    # Per-class Dice on the same example.
    np.testing.assert_allclose(m.dice, [20 / 23, 6 / 7, 0.0, 0.0], rtol=1e-6)


# ----------------------------------------------------------------------------- brute force


def _brute_force(pred_c, gt_c, spacing):
    """HD95 and symmetric ASD from all-pairs distances between boundary voxels."""
    sp = np.asarray(spacing, dtype=np.float64)
    bp = np.argwhere(pred_c & ~ndimage.binary_erosion(pred_c)) * sp
    bg = np.argwhere(gt_c & ~ndimage.binary_erosion(gt_c)) * sp
    d = cdist(bp, bg)
    d_pg, d_gp = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    asd = np.concatenate([d_pg, d_gp]).mean()
    return hd95, asd


def _blobs(rng, shape, num_classes, sigma):
    x = ndimage.gaussian_filter(rng.standard_normal((num_classes - 1, *shape)), (0, *([sigma] * len(shape))))
    lab = np.zeros(shape, dtype=np.int64)
    for c in range(1, num_classes):
        lab[x[c - 1] > np.quantile(x[c - 1], 0.8)] = c
    return lab


@pytest.mark.parametrize(
    "shape,spacing,sigma",
    [((28, 36), (0.7, 1.9), 3.0), ((12, 15, 10), (2.5, 0.6, 1.3), 2.0)],
)
def test_distances_match_brute_force(shape, spacing, sigma):
    rng = np.random.default_rng(42)
    C = 3
    gt = _blobs(rng, shape, C, sigma)
    pred = _blobs(rng, shape, C, sigma)
    for lab in (gt, pred):
        assert set(np.unique(lab)) == set(range(C))
    m = case_metrics(pred, gt, num_classes=C, spacing=spacing)
    for c in range(C):  # background included
        hd95, asd = _brute_force(pred == c, gt == c, spacing)
        assert m.hd95_mm[c] == pytest.approx(hd95, rel=1e-5), c
        assert m.asd_mm[c] == pytest.approx(asd, rel=1e-5), c
    # The anisotropy matters for this case: reversed spacing gives a different answer.
    rev = _brute_force(pred == 1, gt == 1, spacing[::-1])
    assert not np.isclose(rev[1], m.asd_mm[1])


def test_shared_distance_computation_equals_monai_public_functions():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from monai.networks.utils import one_hot
    import torch

    rng = np.random.default_rng(7)
    gt = _blobs(rng, (30, 26), 3, 2.5)
    pred = _blobs(rng, (30, 26), 3, 2.5)
    spacing = (1.3, 0.4)
    m = case_metrics(pred, gt, num_classes=3, spacing=spacing)
    P = one_hot(torch.from_numpy(pred)[None, None], 3, dim=1)
    G = one_hot(torch.from_numpy(gt)[None, None], 3, dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(P, G, include_background=True, percentile=95, spacing=list(spacing))
        asd = compute_average_surface_distance(P, G, include_background=True, symmetric=True, spacing=list(spacing))
    np.testing.assert_allclose(m.hd95_mm, hd[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(m.asd_mm, asd[0].numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- validation & helpers


def test_invalid_inputs():
    gt = np.zeros((6, 6), dtype=np.int64)
    bad = gt.copy()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="label values"):
        case_metrics(bad, gt, num_classes=3)
    with pytest.raises(ValueError, match="label values"):
        case_metrics(gt, bad - 4, num_classes=3)
    with pytest.raises(ValueError, match="shapes differ"):
        case_metrics(gt, np.zeros((6, 7), dtype=np.int64), num_classes=3)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(gt, gt, num_classes=3, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="integer"):
        case_metrics(gt + 0.5, gt, num_classes=3)
    # integral floats (e.g. nibabel get_fdata) are accepted
    assert case_metrics(gt.astype(np.float32), gt, num_classes=3).dice[0] == 1.0


def test_to_row():
    pred, gt = _line_pair()
    m = case_metrics(pred, gt, num_classes=2, spacing=(2.0, 1.0))
    row = m.to_row(["background", "line"])
    assert row["dice_line"] == 0.0 and row["hd95_mm_line"] == 6.0 and row["asd_mm_background"] >= 0
    assert row["mean_foreground_dice"] == 0.0 and "generalized_dice" in row
    assert all(isinstance(v, float) for v in row.values())
    with pytest.raises(ValueError):
        m.to_row(["only_one"])


# ----------------------------------------------------------------------------- summarize


def _cm(dice, gd, hd=None):
    dice = np.asarray(dice, dtype=float)
    hd = dice * 0 + 1.0 if hd is None else np.asarray(hd, dtype=float)
    return CaseMetrics(
        dice=dice,
        jaccard=dice / (2 - dice),
        hd95_mm=hd,
        asd_mm=hd / 2,
        generalized_dice=gd,
        mean_foreground_dice=float(np.nanmean(dice[1:])) if np.isfinite(dice[1:]).any() else float("nan"),
    )


def test_summarize_nan_conventions():
    nan = float("nan")
    cases = [
        _cm([1.0, 0.8, nan, nan], 0.9, hd=[0.0, 2.0, nan, nan]),
        _cm([1.0, 0.6, 0.5, nan], 0.7, hd=[0.0, 4.0, 10.0, nan]),
        _cm([1.0, nan, nan, nan], 0.8, hd=[0.0, nan, nan, nan]),
    ]
    names = ["bg", "A", "B", "never"]
    s = summarize(cases, names)
    assert s["n_cases"] == 3
    pc = s["per_class"]
    assert set(pc) == set(names)
    assert pc["A"]["dice"] == pytest.approx(0.7) and pc["A"]["n_cases"] == 2
    assert pc["B"]["dice"] == pytest.approx(0.5) and pc["B"]["n_cases"] == 1
    assert pc["bg"]["dice"] == 1.0 and pc["bg"]["n_cases"] == 3
    assert math.isnan(pc["never"]["dice"]) and pc["never"]["n_cases"] == 0
    # headline: mean over foreground classes of per-class means; "never" excluded
    assert s["mean_foreground_dice"] == pytest.approx((0.7 + 0.5) / 2)
    # second figure: mean over cases of case means (0.8, 0.55; case 3 NaN ignored)
    assert s["mean_case_foreground_dice"] == pytest.approx((0.8 + 0.55) / 2)
    assert s["generalized_dice"] == pytest.approx(0.8)
    assert pc["A"]["jaccard"] == pytest.approx((0.8 / 1.2 + 0.6 / 1.4) / 2)
    assert s["jaccard"] == pytest.approx(((0.8 / 1.2 + 0.6 / 1.4) / 2 + 0.5 / 1.5) / 2)
    assert pc["A"]["hd95_mm"] == pytest.approx(3.0) and pc["B"]["hd95_mm"] == pytest.approx(10.0)
    assert s["hd95_mm"] == pytest.approx(6.5)
    assert s["asd_mm"] == pytest.approx(3.25)
    with pytest.raises(ValueError):
        summarize(cases, names[:3])
    with pytest.raises(ValueError):
        summarize([], names)


def test_summarize_end_to_end():
    pred, gt = _line_pair()
    a = case_metrics(pred, gt, num_classes=3, spacing=(2.0, 1.0))  # class 2 absent in both
    b = case_metrics(gt, gt, num_classes=3, spacing=(2.0, 1.0))
    s = summarize([a, b], ["bg", "line", "other"])
    assert s["per_class"]["line"]["dice"] == pytest.approx(0.5)
    assert s["per_class"]["line"]["hd95_mm"] == pytest.approx(3.0)
    assert s["per_class"]["other"]["n_cases"] == 0
    assert s["mean_foreground_dice"] == pytest.approx(0.5)
