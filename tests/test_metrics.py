"""Tests for inrseg.metrics: hand-computed values and an independent brute-force surface distance."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from monai.networks.utils import one_hot
from scipy import ndimage
from scipy.spatial.distance import cdist

from conftest import write_nnunet
from inrseg.data.volume import Volume
from inrseg.metrics import (BRATS_REGIONS, CaseMetrics, annotation_stats, case_metrics, cine_metrics,
                            image_diagonal_mm, region_metrics, score_case, summarize)


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


# ----------------------------------------------------------------------------- ignore label, 3D+t


def _random_maps(shape, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.int64)
    pred = np.zeros(shape, np.int64)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for c in range(1, num_classes):  # overlapping blobs: surfaces are meaningful, every class present
        centre = np.array([rng.uniform(0.35, 0.65) * n for n in shape])
        for arr, shift in ((gt, 0.0), (pred, rng.uniform(-0.15, 0.15, len(shape)) * np.array(shape))):
            r = np.sqrt(sum((g - x) ** 2 for g, x in zip(grids, centre + shift)))
            arr[r < rng.uniform(0.2, 0.3) * min(shape[:2])] = c
    return pred, gt


def test_ignored_voxels_change_no_metric():
    """Ignored GT slices: the metrics equal those of the annotated slices alone (distances
    included), and the prediction at ignored voxels does not matter."""
    pred, gt = _random_maps((24, 20, 10))
    spacing = (1.2, 1.0, 4.0)
    kept = slice(3, 8)
    gt_ign = np.full_like(gt, 255)
    gt_ign[..., kept] = gt[..., kept]
    ref = case_metrics(pred[..., kept], gt[..., kept], 3, spacing)
    m = _no_warnings(case_metrics, pred, gt_ign, 3, spacing, ignore_label=255)
    other = pred.copy()
    other[..., :3] = (other[..., :3] + 1) % 3  # arbitrary changes where the GT is ignored
    m2 = case_metrics(other, gt_ign, 3, spacing, ignore_label=255)
    for got in (m, m2):
        for k in ("dice", "jaccard", "hd95_mm", "asd_mm"):
            np.testing.assert_allclose(getattr(got, k), getattr(ref, k), rtol=1e-6, err_msg=k)
        assert got.generalized_dice == pytest.approx(ref.generalized_dice, rel=1e-6)
    # scattered ignored voxels: Dice equals the Dice of the gathered annotated voxels
    rng = np.random.default_rng(1)
    mask = rng.random(gt.shape) < 0.3
    gt_s = np.where(mask, 255, gt)
    m3 = case_metrics(pred, gt_s, 3, distances=False, ignore_label=255)
    ref3 = case_metrics(pred[~mask][:, None], gt[~mask][:, None], 3, distances=False)
    np.testing.assert_allclose(m3.dice, ref3.dice, rtol=1e-6)
    assert m3.generalized_dice == pytest.approx(ref3.generalized_dice, rel=1e-6)
    # without the ignore label declared, 255 is an invalid label; nothing annotated -> NaN
    with pytest.raises(ValueError):
        case_metrics(pred, gt_ign, 3)
    assert np.isnan(case_metrics(pred, np.full_like(gt, 255), 3, ignore_label=255).dice).all()


def test_cine_metrics_mean_over_annotated_frames():
    frames = [_random_maps((16, 16, 4), seed=s) for s in range(4)]
    pred = np.stack([p for p, _ in frames], -1)
    gt = np.stack([g for _, g in frames], -1)
    gt[..., 2] = 255  # frame 2 unannotated: skipped
    gt[..., 1, 3] = 255  # frame 3: slice 1 unannotated
    m = score_case(pred, gt, 3, (1.0, 1.0, 5.0), ignore_label=255)
    assert m.frames == (0, 1, 3)
    per = [case_metrics(pred[..., t], gt[..., t], 3, (1.0, 1.0, 5.0), ignore_label=255) for t in (0, 1, 3)]
    for k in ("dice", "hd95_mm"):
        np.testing.assert_allclose(getattr(m, k), np.mean([getattr(f, k) for f in per], 0), rtol=1e-6)
    assert m.mean_foreground_dice == pytest.approx(np.mean([f.dice for f in per], 0)[1:].mean())
    assert cine_metrics(pred, np.full_like(gt, 255), 3, ignore_label=255).frames == ()
    stats = annotation_stats(gt, 255)
    assert stats["annotated_frames"] == 3 and stats["frames"] == 4
    assert stats["annotated_slices"] == 11 and stats["slices"] == 16


def test_one_4d_definition_evaluate_bench_nisf(tmp_path):
    """The 4D metric is the same number through `inrseg evaluate`, the benchmark's scoring
    (:func:`score_case`, what ``inrseg bench`` calls per test case) and NISF's choice of
    inference steps (with some unannotated frames)."""
    import nibabel as nib

    from inrseg.eval.evaluate import evaluate_dirs
    from inrseg.methods.nisf import NISF, NISFConfig

    frames = [_random_maps((12, 12, 3), seed=s) for s in range(5)]
    pred = np.stack([p for p, _ in frames], -1)
    gt = np.stack([g for _, g in frames], -1)
    gt[..., [1, 4]] = 255
    gt[..., 0, 0] = 255
    aff = np.diag([1.5, 1.5, 6.0, 1.0])
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(gt.astype(np.uint8), aff), tmp_path / "gt" / "s1.nii.gz")
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), aff), tmp_path / "pred" / "s1.nii.gz")
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0, "a": 1, "b": 2}, "ignore": 255}')
    per_case, summary, _ = evaluate_dirs(tmp_path / "pred", tmp_path / "gt", distances=False)
    via_evaluate = per_case[0][1].mean_foreground_dice
    via_bench = score_case(pred, gt, 3, (1.5, 1.5, 6.0), distances=False, ignore_label=255).mean_foreground_dice

    model = NISF(["bg", "a", "b"], 4, 1, NISFConfig(width=8, depth=1, infer_max_steps=1, curve_every=1,
                                                    infer_points=64))
    image = Volume(np.random.default_rng(0).random((1,) + gt.shape).astype(np.float32), aff, 4)
    grid, flat = model.grid_coords(gt.shape, image.spacing), torch.from_numpy(pred.reshape(-1))

    def fixed_prediction(coords, latents, **wanted):  # `pred` wherever the field is queried
        return {"labels": flat[torch.cdist(coords[0], grid).argmin(1)][None]}

    model.query = fixed_prediction
    labels = Volume(gt, aff, 4, meta={"ignore_label": 255})
    _, curve = model.select_infer_steps([(image, labels)])
    via_nisf = curve[-1]["dice"]
    # whole-cine-as-one-volume (the old NISF number) differs: the definition matters
    whole = case_metrics(pred.reshape(12, 12, -1), gt.reshape(12, 12, -1), 3, distances=False,
                         ignore_label=255).mean_foreground_dice
    assert via_evaluate == pytest.approx(via_bench, abs=1e-12)
    assert via_nisf == pytest.approx(via_evaluate, abs=1e-12)
    assert summary["mean_case_foreground_dice"] == pytest.approx(via_evaluate, abs=1e-12)
    assert abs(whole - via_evaluate) > 1e-4


# ----------------------------------------------------------------------------- BraTS regions
def _binary_dice(p: np.ndarray, g: np.ndarray) -> float:
    s = p.sum() + g.sum()
    return float("nan") if s == 0 else 2.0 * np.logical_and(p, g).sum() / s


def test_brats_regions_are_unions_of_labels_scored_as_one_structure():
    """Whole tumour = labels 1-4, tumour core = 1, 3, 4, enhancing = 4 (BraTS 2015 and 2017+),
    each scored as a binary map; ignored voxels stay out."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (20, 18, 6))
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 5, gt.shape))
    gt_ign = np.where(rng.random(gt.shape) < 0.1, 255, gt)
    keep = gt_ign != 255
    got = region_metrics(pred, gt_ign, BRATS_REGIONS, distances=False, ignore_label=255)
    expected_sets = {"whole tumour": {1, 2, 3, 4}, "tumour core": {1, 3, 4}, "enhancing tumour": {4}}
    assert set(got) == set(expected_sets)
    for name, labels in expected_sets.items():
        ref = _binary_dice(np.isin(pred[keep], list(labels)), np.isin(gt[keep], list(labels)))
        assert got[name].dice[1] == pytest.approx(ref), name


def test_evaluate_regions_brats_cli(cli, tmp_path):
    names = {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing-tumour": 3, "enhancing-tumour": 4}
    root = write_nnunet(tmp_path / "ds", n=3, labels=names)
    res = cli("evaluate", "--pred", root / "labelsTr", "--gt", root / "labelsTr", "--out", tmp_path / "rep",
              "--regions", "brats", "--no-distances")
    assert res.code == 0, res.err
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert set(summary["regions"]) == {"whole tumour", "tumour core", "enhancing tumour"}
    assert all(r["dice"] == pytest.approx(1.0) and r["n_cases"] == 3 for r in summary["regions"].values())
    header = (tmp_path / "rep" / "per_case.csv").read_text().splitlines()[0]
    assert "dice_whole_tumour" in header and "hd95_mm_enhancing_tumour" in header
    assert "region: tumour core" in res.out
    bad = cli("evaluate", "--pred", root / "labelsTr", "--gt", root / "labelsTr", "--out", tmp_path / "rep2",
              "--regions", "kits")
    assert bad.code == 2 and "--regions" in bad.err


def test_overlay_has_a_legend_of_the_classes_shown():
    """Every overlay names its colours: one legend entry per class present in the prediction or
    the ground truth, with the dataset's class name and the colour drawn for that label."""
    import matplotlib
    from matplotlib.colors import to_rgba

    from inrseg.viz.overlays import overlay_figure

    matplotlib.use("Agg")
    img = Volume(np.random.default_rng(0).random((1, 12, 10)).astype(np.float32), np.eye(4), 2)
    pred = np.zeros((12, 10), np.int64)
    pred[2:5, 2:5] = 1
    gt = np.zeros((12, 10), np.int64)
    gt[6:9, 6:9] = 3
    fig = overlay_figure(img, pred, gt, names=["background", "cortex", "white matter", "csf"])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["cortex", "csf"]
    # the legend colour of a class is the colour its pixels are drawn in
    cmap = fig.axes[1].images[1].cmap
    assert legend.legend_handles[0].get_facecolor()[:3] == pytest.approx(to_rgba(cmap(1))[:3])
    assert legend.legend_handles[1].get_facecolor()[:3] == pytest.approx(to_rgba(cmap(3))[:3])
