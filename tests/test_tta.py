"""Test-time augmentation (``segment --tta``), uncertainty maps (``--save-uncertainty``) and the
calibration figures of ``evaluate --probabilities``: one mechanism for every method
(:mod:`inrseg.methods.tta`, :mod:`inrseg.eval.calibration`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from inrseg.data.nifti import save_image, save_labels
from inrseg.data.volume import Volume
from inrseg.eval.calibration import case_calibration, expected_calibration_error, most_certain
from inrseg.methods.base import Segmenter, TTAMember
from inrseg.methods.registry import load_segmenter
from inrseg.methods.tta import entropy, refit_plan, tta_probabilities

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "equivalence"   # tiny trained models of every method


@dataclass
class _Config:
    seed: int = 0


class _Ramp(Segmenter):
    """A deterministic model whose logits depend on the intensity and on the position (so they are
    not mirror-symmetric): ``flip`` mirrors its output along those grid axes (a "flipped model":
    ``logits(x) = F(A(F x))``)."""

    method = "ramp"
    config_class = _Config

    def __init__(self, spatial_ndim: int, flip: tuple[int, ...] = ()) -> None:
        super().__init__(["background", "a", "b"], spatial_ndim)
        self.flip = flip

    def plain_logits(self, x: np.ndarray) -> torch.Tensor:
        ramps = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in x.shape], indexing="ij")
        return torch.from_numpy(np.stack([x + ramps[0], 2 * x * ramps[-1], ramps[0] * ramps[-1] - x]).astype(np.float32))

    def logits(self, image: Volume, scale=1.0):
        dims = [1 + a for a in self.flip]
        x = np.flip(image.data, dims)[0] if dims else image.data[0]
        out = self.plain_logits(np.ascontiguousarray(x))
        return (torch.flip(out, dims) if dims else out), image.affine


def _image(shape: tuple[int, ...], symmetric: bool, seed: int = 0) -> Volume:
    """A mirror-symmetric blob (exactly symmetric along every axis), or a random image."""
    if symmetric:
        grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
        data = np.exp(-sum(g ** 2 for g in grids) / 20.0)
    else:
        data = np.random.default_rng(seed).normal(size=shape)
    return Volume(data[None].astype(np.float32), np.diag([1.5] * 3 + [1.0]), len(shape))


def _flip(a: np.ndarray, axis: int) -> np.ndarray:
    return np.flip(a, 1 + axis)          # probabilities (K, *S): axis 0 is the class


# ============================================================================================ mirrors

@pytest.mark.parametrize("shape", [(10, 12), (6, 8, 7)])
def test_tta_of_a_mirror_symmetric_phantom_with_a_flipped_model_equals_the_flipped_prediction(shape):
    image = _image(shape, symmetric=True)
    model, flipped = _Ramp(len(shape)), _Ramp(len(shape), flip=(0,))
    plain = model.predict_probabilities(image).data
    assert not np.allclose(flipped.predict_probabilities(image).data, plain)   # the flip shows without TTA
    mean, _ = tta_probabilities(model, image)
    flipped_mean, _ = tta_probabilities(flipped, image)
    np.testing.assert_allclose(flipped_mean.data, _flip(mean.data, 0), atol=1e-6)
    for axis in range(len(shape)):  # the members flipped back: the mean of a symmetric phantom is symmetric
        np.testing.assert_allclose(mean.data, _flip(mean.data, axis), atol=1e-6)


@pytest.mark.parametrize("shape", [(10, 12), (6, 8, 7)])
def test_tta_is_mirror_equivariant_on_any_image(shape):
    """TTA of a mirrored image is the mirrored TTA (all 2^d mirrorings, each flipped back)."""
    image, model = _image(shape, symmetric=False), _Ramp(len(shape))
    mean, var = tta_probabilities(model, image)
    for axis in range(len(shape)):
        m2, v2 = tta_probabilities(model, image.with_data(np.ascontiguousarray(_flip(image.data, axis))))
        np.testing.assert_allclose(m2.data, _flip(mean.data, axis), atol=1e-6)
        np.testing.assert_allclose(v2.data, np.flip(var.data, axis), atol=1e-6)


@pytest.mark.parametrize("name, members", [("unet-2d", 4), ("unet-3d", 8), ("morse-2d", 4)])
def test_cnn_members_are_every_mirroring_and_the_first_is_the_plain_prediction(name, members):
    model = load_segmenter(FIXTURES / f"{name}.safetensors")
    shape = (32, 32) if model.spatial_ndim == 2 else (16, 16, 16)
    image = _image(shape, symmetric=False, seed=1)
    todo = model.tta_members()
    assert len(todo) == members and todo[0].name == "identity"
    assert len({m.name for m in todo}) == members
    plain = model.predict_probabilities(image)
    one, var1 = tta_probabilities(model, image, members=1)
    np.testing.assert_array_equal(one.data, plain.data)
    np.testing.assert_array_equal(one.affine, plain.affine)
    assert not var1.data.any()
    mean, var = tta_probabilities(model, image)
    assert mean.data.shape == plain.data.shape and mean.data.dtype == np.float32
    assert var.data.shape == shape and var.data.dtype == np.float32
    np.testing.assert_allclose(mean.data.sum(0), 1.0, atol=1e-5)
    assert not np.array_equal(mean.data, plain.data)     # the mirrored members count
    assert len(model.tta_members(3)) == 3
    with pytest.raises(ValueError, match=f"1 to {members}"):
        model.tta_members(members + 1)


# ============================================================================================ refits

def test_refit_plan_varies_seeds_and_steps_around_the_chosen_ones():
    assert refit_plan(20, 3) == [(3, 20), (4, 15), (5, 25), (6, 30)]
    assert refit_plan(20, 3, 6)[4:] == [(7, 20), (8, 15)]
    with pytest.raises(ValueError):
        refit_plan(20, 3, 0)


@pytest.mark.parametrize("name", ["metaseg-2d", "nisf-2d"])
def test_inr_members_are_k_refits_with_other_seeds(name):
    model = load_segmenter(FIXTURES / f"{name}.safetensors")
    image = _image((32, 32), symmetric=False, seed=2)
    seed = model.config.seed
    todo = model.tta_members()
    assert len(todo) == 4 and len(model.tta_members(2)) == 2
    assert [m.name.split(",")[0] for m in todo] == [f"refit seed {seed + k}" for k in range(4)]
    plain = model.predict_probabilities(image).data
    one, _ = tta_probabilities(model, image, members=1)
    np.testing.assert_allclose(one.data, plain, atol=1e-6)          # member 0: the plain fit
    steps = model.chosen_settings().get("t_f", model.chosen_settings().get("infer_steps"))
    same = model.logits(image, steps=steps, seed=seed)[0]
    np.testing.assert_array_equal(same.cpu().numpy(), model.logits(image)[0].cpu().numpy())   # defaults = today's
    other = model.logits(image, steps=steps, seed=seed + 1)[0]
    assert not torch.equal(other, same)                                # the seed changes the fit
    mean, var = tta_probabilities(model, image)
    np.testing.assert_allclose(mean.data.sum(0), 1.0, atol=1e-5)
    assert var.data.max() > 0 and not np.array_equal(mean.data, plain)


# ============================================================================================ uncertainty

class _Members(_Ramp):
    """Three members: confident and identical on the left half of the grid, each confident in
    another class on the right half."""

    def tta_members(self, n=None):
        def member(k: int):
            def logits(image, scale=1.0):
                out = torch.zeros((3,) + image.shape)
                out[0, : image.shape[0] // 2] = 30.0
                out[k, image.shape[0] // 2:] = 30.0
                return out, image.affine
            return TTAMember(f"member {k}", logits)
        return [member(k) for k in range(3)][:n]


def test_uncertainty_is_zero_where_members_agree_and_positive_where_they_disagree():
    image = _image((8, 6), symmetric=False)
    mean, var = tta_probabilities(_Members(2), image)
    h = entropy(mean.data)
    assert not var.data[:4].any() and (var.data[4:] > 0.1).all()
    assert h[:4].max() < 1e-6 and np.allclose(h[4:], np.log(3), atol=1e-4)
    np.testing.assert_allclose(mean.data[:, 4:], 1 / 3, atol=1e-6)


def test_entropy_is_zero_for_one_hot_and_log_k_for_uniform():
    p = np.zeros((4, 3, 2), np.float32)
    p[1] = 1.0
    assert not entropy(p).any()
    np.testing.assert_allclose(entropy(np.full((4, 3, 2), 0.25, np.float32)), np.log(4), rtol=1e-6)


# ============================================================================================ calibration

def test_ece_is_zero_when_calibrated_and_large_when_over_confident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    probs = np.stack([1 - conf, conf])                              # class 1 predicted with confidence conf
    gt = (rng.uniform(size=conf.size) < conf).astype(np.int64)     # ... and right that often
    assert expected_calibration_error(probs, gt) < 0.01
    exact = np.array([[0.25] * 4, [0.75] * 4])
    assert expected_calibration_error(exact, np.array([1, 1, 1, 0])) == pytest.approx(0.0, abs=1e-12)
    sure = np.stack([np.full(conf.size, 0.01), np.full(conf.size, 0.99)])
    wrong = (rng.uniform(size=conf.size) < 0.6).astype(np.int64)   # right 60 % of the time
    assert expected_calibration_error(sure, wrong) == pytest.approx(0.39, abs=0.01)
    # the gaps of the bins add up in absolute value: over- and under-confidence do not cancel
    mixed = np.array([[0.4] * 4 + [0.1] * 4, [0.6] * 4 + [0.9] * 4])
    assert expected_calibration_error(mixed, np.array([1] * 4 + [1, 1, 0, 0])) == pytest.approx(0.4)
    # unlabelled voxels count nowhere
    assert expected_calibration_error(exact, np.array([1, 1, 1, 9]), ignore_label=9) == pytest.approx(0.25)


def test_most_certain_dice_beats_all_voxel_dice_where_the_errors_are_uncertain():
    yy, xx = np.mgrid[:40, :40]
    gt = ((yy - 20) ** 2 + (xx - 20) ** 2 < 100).astype(np.int64)
    probs = np.stack([1.0 - gt, gt.astype(float)]).astype(np.float32) * 0.98 + 0.01
    wrong = np.zeros_like(gt, bool)
    wrong[::7, ::3] = True                                          # ~5 % of the voxels, labelled wrong, unsure
    probs[:, wrong] = np.where(gt[wrong] == 1, [[0.55], [0.45]], [[0.45], [0.55]])
    m = case_calibration(probs, gt)
    assert m["dice_most_certain"] == pytest.approx(1.0) and m["dice_all"] < 0.97
    certain = most_certain(probs)
    assert certain.sum() == int(np.ceil(0.9 * gt.size)) and not (certain & wrong).any()
    assert m["ece"] > 0 and m["mean_entropy"] > 0


# ============================================================================================ CLI

def _write_case(folder: Path, shape: tuple[int, ...]) -> tuple[Path, Path]:
    """An image and its labels on an oblique, shifted grid; returns (image dir, label dir)."""
    grids = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    lab = (sum(g ** 2 for g in grids) < (min(shape) / 3) ** 2).astype(np.uint8)
    img = (0.1 + 0.8 * lab + np.random.default_rng(0).normal(0, 0.05, shape)).astype(np.float32)
    affine = np.array([[1.5, 0.2, 0, 10.0], [0, 1.25, 0, -4.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
    like = Volume(lab, affine, len(shape))
    save_image(img, folder / "img" / "c0_0000.nii.gz", like=like)
    save_labels(lab, folder / "gt" / "c0.nii.gz", like=like)
    return folder / "img", folder / "gt"


@pytest.mark.parametrize("name, shape", [("unet-2d", (32, 32)), ("unet-3d", (16, 16, 16))])
def test_segment_writes_uncertainty_maps_on_the_label_grid_and_evaluate_scores_them(cli, tmp_path, name, shape):
    images, gts = _write_case(tmp_path, shape)
    model = FIXTURES / f"{name}.safetensors"
    out = tmp_path / "out"
    r = cli("segment", "--model", model, "--input", images, "--output", out, "--tta", "--save-uncertainty",
            "--save-probabilities", "--device", "cpu")
    assert r.code == 0, r.err
    labels = nib.load(out / "c0.nii.gz")
    for kind in ("entropy", "variance"):
        m = nib.load(out / f"c0_{kind}.nii.gz")
        assert m.shape == labels.shape and np.allclose(m.affine, labels.affine)
        assert np.asarray(m.dataobj).dtype == np.float32 and (np.asarray(m.dataobj) >= 0).all()
    with np.load(out / "c0.npz") as z:
        probs = z["probabilities"]
    np.testing.assert_allclose(np.asarray(nib.load(out / "c0_entropy.nii.gz").dataobj).reshape(shape),
                               entropy(probs), atol=1e-6)
    plain = tmp_path / "plain"
    assert cli("segment", "--model", model, "--input", images, "--output", plain, "--save-uncertainty",
               "--device", "cpu").code == 0
    assert (plain / "c0_entropy.nii.gz").is_file() and not (plain / "c0_variance.nii.gz").exists()
    report = tmp_path / "report"
    r = cli("evaluate", "--pred", out, "--gt", gts, "--out", report, "--probabilities", out, "--no-distances")
    assert r.code == 0, r.err
    cal = json.loads((report / "summary.json").read_text())["calibration"]
    assert cal["ece_bins"] == 15 and cal["certain_fraction"] == 0.9 and cal["n_cases"] == 1
    assert 0 <= cal["ece"] <= 1 and cal["dice_all"] == pytest.approx(
        json.loads((report / "summary.json").read_text())["mean_foreground_dice"], abs=1e-6)
    assert "calibration error" in r.out and "most certain 90 %" in r.out


def test_uncertainty_maps_follow_the_output_grid_of_scale(cli, tmp_path):
    images, _ = _write_case(tmp_path, (32, 32))
    out = tmp_path / "out"
    r = cli("segment", "--model", FIXTURES / "unet-2d.safetensors", "--input", images, "--output", out, "--tta",
            "--save-uncertainty", "--scale", "2", "--device", "cpu")
    assert r.code == 0, r.err
    labels = nib.load(out / "c0.nii.gz")
    assert labels.shape[:2] == (64, 64)
    for kind in ("entropy", "variance"):
        m = nib.load(out / f"c0_{kind}.nii.gz")
        assert m.shape == labels.shape and np.allclose(m.affine, labels.affine)


def test_segment_refuses_members_the_method_does_not_have(cli, tmp_path):
    images, _ = _write_case(tmp_path, (32, 32))
    model = FIXTURES / "unet-2d.safetensors"
    r = cli("segment", "--model", model, "--input", images, "--output", tmp_path / "o", "--tta", "--tta-members", "5")
    assert r.code == 2 and "1 to 4" in r.err and not (tmp_path / "o").exists()
    r = cli("segment", "--model", model, "--input", images, "--output", tmp_path / "o", "--tta-members", "2")
    assert r.code == 2 and "--tta" in r.err
