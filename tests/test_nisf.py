"""NISF: Gabor layers, prior training, frozen-network latent inference, continuous-space outputs.

Tiny sizes throughout (2D 32 x 32 brain phantoms, 3D+t 24 x 24 x 4 x 4 cardiac phantoms) so the
whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from inrseg.core.errors import InputError
from inrseg.data.grids import resampled_affine
from inrseg.data.nifti import load_labels, save_labels
from inrseg.data.phantoms.brain import BRAIN_LABELS, brain_phantom
from inrseg.data.phantoms.cardiac import CARDIAC_LABELS, cardiac_phantom
from inrseg.data.planes import heldout_mask, plane_points
from inrseg.data.volume import IGNORE, Volume
from inrseg.engine import OPEN_ENDED_STEPS, Budget, step_rng
from inrseg.engine.checkpoints import read_metadata
from inrseg.methods.base import BatchPrediction, FitDiagnostics, HeldOutSlices, PlaneRendering, Segmenter, StepCurves
from inrseg.methods.configs import field_help
from inrseg.methods.nisf import (NISF, RECIPE, NISFConfig, PriorTraining, annotated_frames, build_network,
                                 config_from_preset, load_training_subjects, mean_dice, point_weights, prior_loss,
                                 sample_points, seg_weights, soft_dice_loss)
from inrseg.methods.registry import capabilities, load_segmenter, segmenter_class
from inrseg.nn.gabor import GaborLayer, SineLayer, gabor_activation, make_layer, split_linear
from inrseg.viz.overlays import save_plane_png

BRAIN_NAMES = list(BRAIN_LABELS)
CARDIAC_NAMES = list(CARDIAC_LABELS)
BRAIN_AFFINE = np.diag([150 / 32, 150 / 32, 1.0, 1.0])
CARDIAC_SPACING = (5.0, 5.0, 16.0)   # 24 x 24 x 4 voxels: a 120 x 120 x 64 mm field of view


def brain_pair(seed: int, shape=(32, 32)) -> tuple[Volume, Volume]:
    img, lab = brain_phantom(shape, seed)
    return Volume(img[None], BRAIN_AFFINE, 2), Volume(lab.astype(np.int64), BRAIN_AFFINE, 2)


def cardiac_pair(seed: int) -> tuple[Volume, Volume]:
    img, lab = cardiac_phantom((24, 24, 4), frames=4, seed=seed, spacing=CARDIAC_SPACING)
    aff = np.diag(list(CARDIAC_SPACING) + [1.0])
    aff[:3, 3] = [-60.0, -50.0, 10.0]
    return (Volume(img[None], aff, 4, time_step=0.05),
            Volume(lab.astype(np.int64), aff, 4, time_step=0.05))


TINY_2D = dict(width=64, depth=4, steps=250, lr=1e-3, infer_lr=1e-2, infer_max_steps=60,
               curve_every=10, save_every=50)
TINY_4D = dict(width=32, depth=3, steps=40, lr=1e-3, points_per_step=1024, infer_lr=1e-2,
               infer_max_steps=20, curve_every=10, infer_steps=10, save_every=20)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def brain_data():
    return ([brain_pair(s) for s in range(6)], [brain_pair(s) for s in (100, 101)],
            [brain_pair(s) for s in (200, 201)])


@pytest.fixture(scope="module")
def trained2d(brain_data):
    train, val, _ = brain_data
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(**TINY_2D))
    model.fit(train, val)
    return model


@pytest.fixture(scope="module")
def cardiac_data():
    return [cardiac_pair(s) for s in range(3)], [cardiac_pair(10)], cardiac_pair(20)


@pytest.fixture(scope="module")
def trained4d(cardiac_data):
    train, val, _ = cardiac_data
    model = NISF(CARDIAC_NAMES, 4, 1, NISFConfig(**TINY_4D))
    model.fit(train, val)
    return model


# ------------------------------------------------------------------------------ layers


def test_gabor_layer_matches_formula():
    torch.manual_seed(0)
    layer = GaborLayer(5, 7, w0=3.0, s0=2.0)
    x = torch.randn(4, 5)
    want = torch.cos(3.0 * layer.freq(x)) * torch.exp(-(2.0 * layer.scale(x)) ** 2)
    torch.testing.assert_close(layer(x), want)
    assert make_layer("gabor", 5, 7).w0 == 10.0 and make_layer("gabor", 5, 7).s0 == 10.0


def test_fused_gabor_gradient():
    g = torch.Generator().manual_seed(0)
    a = (0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: gabor_activation(x, y, 10.0, 10.0), (a, b))
    with torch.no_grad():
        torch.testing.assert_close(gabor_activation(a, b, 3.0, 2.0),
                                   torch.cos(3.0 * a) * torch.exp(-(2.0 * b) ** 2))
    # far in the envelope's tail the value is 0 and the gradient finite
    big = torch.full((3,), 50.0, requires_grad=True)
    gabor_activation(torch.zeros(3), big).sum().backward()
    assert torch.isfinite(big.grad).all()


def test_sine_and_fourier_layers():
    s = SineLayer(3, 8, is_first=True)
    assert s.linear.weight.abs().max() <= 1 / 3
    x = torch.rand(2, 10, 3)
    torch.testing.assert_close(s(x), torch.sin(30.0 * s.linear(x)))
    with pytest.raises(ValueError):
        make_layer("tanh", 3, 4)


def test_split_linear_equals_concatenation():
    lin = torch.nn.Linear(3 + 6, 5)
    x, h = torch.randn(2, 7, 3), torch.randn(2, 6)
    full = lin(torch.cat([x, h[:, None].expand(-1, 7, -1)], -1))
    torch.testing.assert_close(split_linear(lin, x, h), full)


@pytest.mark.parametrize("activation", ["gabor", "sine", "relu"])
def test_network_shapes_and_residual_latent(activation):
    cfg = NISFConfig(activation=activation, width=16, depth=3, latent_size=8, fourier_frequencies=4)
    net = build_network(cfg, 4, 3, 2)
    seg, rec = net(torch.rand(2, 11, 4), torch.randn(2, 8))
    assert seg.shape == (2, 11, 3) and rec.shape == (2, 11, 2)
    assert net.latent_proj is not None
    # latent size = width: the latent is added at the first residual without a projection
    net2 = build_network(NISFConfig(width=16, depth=2), 2, 3, 1)
    assert net2.latent_proj is None and len(net2.layers) == 2
    assert build_network(NISFConfig(), 2, 5, 1).layers[0].freq.in_features == 2 + 128


def test_monai_soft_dice_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    N, C = 50, 4
    p = torch.softmax(torch.randn(N, C, generator=g), -1)                          # (N, C)
    onehot = F.one_hot(torch.randint(0, C, (N,), generator=g), C).float()
    inter = (p * onehot).sum(0)
    want = 1.0 - ((2 * inter + 1.0) / (p.sum(0) + onehot.sum(0) + 1.0)).mean()
    got = soft_dice_loss(p.T[None], onehot.T[None])                                 # (1, C, N)
    assert got.shape == (1,)
    torch.testing.assert_close(got[0], want)


def test_padded_batch_loss_is_the_mean_of_per_image_losses():
    """A step stacks images of different sizes (zero-padded) into one forward pass; its loss is
    the mean of each image's loss, and an image's loss is the paper's formula on its points."""
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2))
    cfg, C = model.config, len(BRAIN_NAMES)
    g = torch.Generator().manual_seed(0)
    sizes = [7, 12]
    items = [(torch.randn(n, C, generator=g), torch.randn(n, 1, generator=g),
              torch.randint(0, C, (n,), generator=g), torch.rand(n, 1, generator=g)) for n in sizes]
    lat = torch.randn(2, 16, generator=g)
    both, parts = prior_loss(*(pad_sequence([it[k] for it in items], batch_first=True) for k in range(4)),
                             point_weights(sizes), lat, alpha=cfg.alpha, latent_reg=cfg.latent_reg)
    ones = []
    for b, (seg, rec, lab, inten) in enumerate(items):
        p = torch.softmax(seg, -1)
        onehot = F.one_hot(lab, C).float()
        inter = (p * onehot).sum(0)
        want = (F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), onehot)
                + 1.0 - ((2 * inter + 1.0) / (p.sum(0) + onehot.sum(0) + 1.0)).mean()
                + cfg.alpha * F.binary_cross_entropy_with_logits(rec, inten)
                + cfg.latent_reg * lat[b].pow(2).mean())
        one, _ = prior_loss(seg[None], rec[None], lab[None], inten[None], point_weights([sizes[b]]),
                            lat[b: b + 1], alpha=cfg.alpha, latent_reg=cfg.latent_reg)
        torch.testing.assert_close(one, want)
        ones.append(one)
    torch.testing.assert_close(both, (ones[0] + ones[1]) / 2)
    assert set(parts) == {"bce", "dice", "rec"}


def test_construction_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2))
    assert torch.equal(torch.rand(3), want)
    b = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2))
    assert all(torch.equal(v, b.net.state_dict()[k]) for k, v in a.net.state_dict().items())
    assert NISF.bf16_safe is False


# ------------------------------------------------------------------------------ training / inference


def test_trained_prior_beats_untrained(trained2d, brain_data):
    _, _, test = brain_data
    untrained = NISF(BRAIN_NAMES, 2, 1, NISFConfig(**TINY_2D))
    untrained.infer_steps = trained2d.infer_steps
    images = [img for img, _ in test]
    d_trained = [mean_dice(p.data, lab.data, 5)[1] for p, (_, lab) in zip(trained2d.predict_batch(images), test)]
    d_untrained = [mean_dice(p.data, lab.data, 5)[1] for p, (_, lab) in zip(untrained.predict_batch(images), test)]
    assert np.mean(d_trained) > 0.5
    assert np.mean(d_trained) > np.mean(d_untrained) + 0.25


def test_steps_chosen_on_validation_curve(trained2d):
    curve = trained2d.val_curve
    steps = [c["step"] for c in curve]
    assert steps[0] == 0 and steps[-1] == TINY_2D["infer_max_steps"]
    assert trained2d.infer_steps in steps and trained2d.infer_steps >= 1
    best = max((c for c in curve if c["step"] >= 1), key=lambda c: c["dice"])
    assert trained2d.infer_steps == best["step"]
    assert all(len(c["per_case"]) == 2 for c in curve)


def test_inference_changes_only_the_latent(trained2d, brain_data):
    img = brain_data[2][0][0]
    before = {k: v.clone() for k, v in trained2d.net.state_dict().items()}
    flags = []
    coords = trained2d.prepare(img).coords
    target = trained2d.prepare(img).intensity
    lat = trained2d.optimise_latents(
        [coords], [target], 5,
        callback=lambda step, h: flags.append(any(p.requires_grad for p in trained2d.net.parameters())))
    assert flags and not any(flags)                        # frozen during inference
    assert all(p.requires_grad for p in trained2d.net.parameters())   # restored after
    after = trained2d.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # bit-identical weights
    assert not torch.allclose(lat[0], trained2d.initial_latent())    # the latent did move


@pytest.mark.parametrize("subsets", [False, True])
def test_batched_latents_equal_one_at_a_time(trained2d, brain_data, subsets):
    model = trained2d
    old = model.config
    if subsets:
        model.config = NISFConfig(**{**TINY_2D, "infer_points": 300})
    try:
        a = brain_data[2][0][0]
        b = brain_pair(7, shape=(28, 32))[0]               # another shape: padded in the batch
        both = model.fit_latents([a, b], steps=15)
        one_a = model.fit_latents([a], steps=15)[0]
        one_b = model.fit_latents([b], steps=15)[0]
    finally:
        model.config = old
    torch.testing.assert_close(both[0].latent, one_a.latent, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1].latent, one_b.latent, atol=1e-5, rtol=1e-4)


def test_resume_continues_from_saved_step(tmp_path, brain_data):
    train = brain_data[0][:3]
    cfg = dict(width=16, depth=2, lr=1e-3, save_every=5, infer_steps=3)
    full = NISF(BRAIN_NAMES, 2, 1, NISFConfig(steps=10, **cfg))
    full.fit(train)
    state = tmp_path / "m.train-state"
    part = NISF(BRAIN_NAMES, 2, 1, NISFConfig(steps=5, **cfg))
    part.fit(train, state_path=state)                       # "killed" after step 5
    resumed = NISF(BRAIN_NAMES, 2, 1, NISFConfig(steps=10, **cfg))
    resumed.fit(train, state_path=state)
    assert [h["step"] for h in resumed.history] == [5, 10]
    for k, v in full.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(resumed.train_latents, full.train_latents, atol=1e-6, rtol=1e-5)


def test_cosine_lr_schedule(tmp_path, brain_data):
    """``lr_schedule="cosine"``: the logged lr after step s is lr * (1 + cos(pi s / steps)) / 2,
    reaching 0 at the last step; the constant schedule keeps lr."""
    for schedule in ("cosine", "constant"):
        log = tmp_path / f"{schedule}.jsonl"
        model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2, steps=8, lr=2e-3, infer_steps=1,
                                                   lr_schedule=schedule))
        model.fit(brain_data[0][:2], log_path=log)
        lrs = [json.loads(line)["lr"] for line in log.read_text().splitlines()]
        want = [2e-3 * (0.5 * (1 + math.cos(math.pi * s / 8)) if schedule == "cosine" else 1.0)
                for s in range(1, 9)]
        assert lrs == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        NISFConfig(lr_schedule="linear")


def test_time_budget_stops_training(tmp_path, brain_data):
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2, steps=1000))
    model.fit(brain_data[0][:2], state_path=tmp_path / "s", budget=Budget(1e-6))
    assert model.history[-1]["step"] == 1 and (tmp_path / "s").exists()


def test_budget_bounds_prior_and_steps_curve(brain_data):
    """An expired budget: one prior step, and the steps curve stops after its step 0 (no step
    >= 1 to choose from: the configured infer_steps stay)."""
    train, val, _ = brain_data
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2, steps=1000, infer_max_steps=1000,
                                               infer_steps=7))
    model.fit(train[:2], val[:1], budget=Budget(1e-6))
    assert model.history[-1]["step"] == 1
    assert [c["step"] for c in model.val_curve] == [0] and model.infer_steps == 7


def test_prior_share_leaves_time_for_the_steps_curve(brain_data, monkeypatch):
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2))
    subs = [model.prepare(*brain_data[1][0])]
    monkeypatch.setattr(model, "curve_seconds", lambda s: 12.0)
    assert model.prior_share(subs, Budget(None)) == 1.0           # no deadline
    assert model.prior_share([], Budget(1.0)) == 1.0              # no steps curve
    assert model.prior_share(subs, Budget(1.0)) == pytest.approx(1 - 1.5 * 12 / 60, abs=0.01)
    monkeypatch.setattr(model, "curve_seconds", lambda s: 40.0)
    assert model.prior_share(subs, Budget(1.0)) == 0.5            # at least half for the prior


def test_every_tensor_on_an_explicit_device(tmp_path, brain_data, cardiac_data):
    """With "meta" as the default device, any tensor, generator or module made without an
    explicit device would be a meta tensor and fail: fit (budget split, resume, log),
    predict, predict_heldout and render_plane run on an explicit "cpu"."""
    train, val, test = brain_data
    c_train, c_val, (c_img, c_lab) = cardiac_data
    cfg2 = dict(width=16, depth=2, save_every=2, points_per_step=300, infer_points=200,
                infer_max_steps=4, curve_every=2)
    torch.set_default_device("meta")
    try:
        part = NISF(BRAIN_NAMES, 2, 1, NISFConfig(steps=2, **cfg2), device="cpu")
        part.fit(train[:2], val[:1], tmp_path / "s", log_path=tmp_path / "log.jsonl", budget=Budget(10.0))
        m2 = NISF(BRAIN_NAMES, 2, 1, NISFConfig(steps=4, **cfg2), device="cpu")
        m2.fit(train[:2], val[:1], tmp_path / "s", log_path=tmp_path / "log.jsonl", budget=Budget(10.0))
        pred = m2.predict(test[0][0], scale=2)
        m4 = NISF(CARDIAC_NAMES, 4, 1, NISFConfig(**{**TINY_4D, "steps": 2, "activation": "relu",
                                                      "fourier_frequencies": 8}), device="cpu")
        m4.fit(c_train[:2], c_val)
        held = m4.predict_heldout(c_img, axis=2, indices=[1], labels=c_lab, steps=2)
        fit = m4.fit_latents([c_img], steps=2)[0]
        centre = c_img.affine[:3, :3] @ np.array([11.5, 11.5, 1.5]) + c_img.affine[:3, 3]
        view = m4.render_plane(fit, centre, [1, 0, 0], [0, 0, 1], (8, 6), frame=0.5)
    finally:
        torch.set_default_device(None)
    assert [h["step"] for h in m2.history] == [2, 4] and m2.train_latents.device.type == "cpu"
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4
    assert pred.shape == (64, 64) and held.labels.shape == c_img.shape
    assert view.labels.shape == (8, 6) and m2.val_curve and m4.val_curve


@pytest.mark.parametrize("activation", ["sine", "relu"])
def test_ablation_activations_train(activation, brain_data):
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(activation=activation, width=16, depth=2, steps=5,
                                               fourier_frequencies=8, infer_steps=2))
    model.fit(brain_data[0][:2])
    pred = model.predict(brain_data[2][0][0])
    assert pred.shape == (32, 32) and np.isfinite(model.history[-1]["loss"])


# ------------------------------------------------------------------------------ continuous space


def test_predict_other_resolutions_2d(trained2d, brain_data):
    img = brain_data[2][0][0]
    fit = trained2d.fit_latents([img], steps=5)[0]
    for scale, shape in ((2, (64, 64)), ((1.5, 0.5), (48, 16))):
        out = trained2d.segment(fit, scale)
        assert out.shape == shape and out.data.dtype == np.int64
        np.testing.assert_allclose(out.affine, resampled_affine(img.affine, img.shape, shape))
    same = trained2d.segment(fit, 1.0)
    np.testing.assert_array_equal(same.affine, img.affine)
    # predict() = fit + segment at the validated step count
    assert trained2d.predict(img, scale=2).shape == (64, 64)


def test_cardiac_4d_prediction_shapes(trained4d, cardiac_data):
    img, lab = cardiac_data[2]
    fit = trained4d.fit_latents([img])[0]
    assert fit.steps == trained4d.infer_steps
    hi = trained4d.segment(fit, (4, 4, 2, 1))
    assert hi.shape == (96, 96, 8, 4) and hi.spatial_ndim == 4 and hi.time_step == 0.05
    np.testing.assert_allclose(hi.affine, resampled_affine(img.affine, img.shape, hi.shape))
    rec = trained4d.reconstruct(fit, 1.0)
    assert rec.data.shape == (1, 24, 24, 4, 4) and 0 <= rec.data.min() and rec.data.max() <= 1
    assert trained4d.segment(fit, (1, 1, 1, 2)).time_step == pytest.approx(0.025)
    assert trained4d.predict(img, 2).time_step == pytest.approx(0.025)   # twice the frames


def test_heldout_slices(trained4d, cardiac_data):
    img, lab = cardiac_data[2]
    res = trained4d.predict_heldout(img, axis=2, indices=[1, 2], labels=lab)
    assert res.labels.shape == img.shape and res.reconstruction.data.shape == (1,) + img.shape
    np.testing.assert_array_equal(res.labels.affine, img.affine)
    assert res.indices == [1, 2] and res.heldout_dice.shape == (4,)
    assert np.isfinite(res.heldout_mean_foreground_dice) and np.isfinite(res.observed_mean_foreground_dice)
    # the held-out slices are never seen: corrupting them leaves the fitted latent unchanged
    mask = heldout_mask(img.shape, 2, [1, 2])
    assert mask.shape == img.shape and not mask[:, :, 1:3].any() and mask[:, :, [0, 3]].all()
    corrupt = img.with_data(img.data.copy())
    corrupt.data[:, :, :, 1:3] = 5 * np.random.default_rng(0).random(corrupt.data[:, :, :, 1:3].shape)
    f1 = trained4d.fit_latents([img], steps=5, observed=[mask])[0]
    f2 = trained4d.fit_latents([corrupt], steps=5, observed=[mask])[0]
    torch.testing.assert_close(f1.latent, f2.latent, atol=0, rtol=0)
    with pytest.raises(ValueError):
        heldout_mask(img.shape, 2, [0, 1, 2, 3])


def test_render_plane_matches_grid_and_long_axis(trained4d, cardiac_data, tmp_path):
    img, _ = cardiac_data[2]
    fit = trained4d.fit_latents([img], steps=5)[0]
    grid = trained4d.segment(fit).data                       # (24, 24, 4, 4)
    A = img.affine
    # a plane through the centres of short-axis slice k at frame t reproduces the grid labels
    k, t = 2, 1
    centre = A[:3, :3] @ np.array([11.5, 11.5, k]) + A[:3, 3]
    view = trained4d.render_plane(fit, centre, A[:3, 0], A[:3, 1], (24, 24),
                                  pixel_mm=CARDIAC_SPACING[0], frame=t)
    assert view.labels.shape == (24, 24) and view.image.shape == (24, 24) and view.frame == t
    assert (view.labels == grid[:, :, k, t]).mean() > 0.99
    np.testing.assert_allclose(view.affine[:3, :2], A[:3, :2], atol=1e-9)
    np.testing.assert_allclose(view.affine[:3, 3], A[:3, 3] + A[:3, 2] * k, atol=1e-9)
    # a long-axis plane (in-plane x and through-plane z) at 2 mm pixels
    la = trained4d.render_plane(fit, centre, [1, 0, 0], [0, 0.2, 1], (40, 30), pixel_mm=(2.0, 2.0))
    assert la.labels.shape == (40, 30) and la.labels.dtype == np.int64
    u = np.array([1.0, 0, 0])
    v = np.array([0, 0.2, 1.0]) / np.linalg.norm([0, 0.2, 1.0])
    np.testing.assert_allclose(la.affine[:3, 0], 2 * u)
    np.testing.assert_allclose(la.affine[:3, 1], 2 * v)
    np.testing.assert_allclose(la.affine[:3, :3] @ [19.5, 14.5, 0] + la.affine[:3, 3], centre)
    pts, aff = plane_points(centre, u, v, (40, 30), 2.0)
    np.testing.assert_allclose(pts.reshape(40, 30, 3)[3, 4], aff[:3, :3] @ [3, 4, 0] + aff[:3, 3])
    png = save_plane_png(la, tmp_path / "lax.png", title="long axis")
    assert png.read_bytes()[:4] == b"\x89PNG"
    image_vol, label_vol = la.as_volumes()
    assert image_vol.shape == (40, 30) and label_vol.spatial_ndim == 2
    with pytest.raises(ValueError):
        trained4d.render_plane(fit, centre, [1, 0, 0], [2, 0, 0], (4, 4))


def test_save_load_identical_predictions(trained4d, cardiac_data, tmp_path):
    img, _ = cardiac_data[2]
    path = tmp_path / "nisf.safetensors"
    trained4d.save(path)
    meta = read_metadata(path)
    assert meta["method"] == "nisf" and meta["infer_steps"] == trained4d.infer_steps
    assert meta["val_curve"] == trained4d.val_curve and meta["config"]["activation"] == "gabor"
    loaded = load_segmenter(path, "nisf")
    assert isinstance(loaded, NISF) and loaded.infer_steps == trained4d.infer_steps
    torch.testing.assert_close(loaded.train_latents, trained4d.train_latents)
    np.testing.assert_array_equal(loaded.predict(img).data, trained4d.predict(img).data)


def test_protocol_and_nifti_output(trained4d, cardiac_data, tmp_path):
    assert isinstance(trained4d, Segmenter) and segmenter_class("nisf") is NISF
    img, _ = cardiac_data[2]
    fit = trained4d.fit_latents([img], steps=2)[0]
    hi = trained4d.segment(fit, (2, 2, 1, 1))
    save_labels(hi.data, tmp_path / "hi.nii.gz", like=hi)
    back = load_labels(tmp_path / "hi.nii.gz", expect_ndim=4)
    np.testing.assert_array_equal(back.data, hi.data)
    np.testing.assert_allclose(back.affine, hi.affine, atol=1e-5)


def test_bad_inputs(trained2d, cardiac_data):
    img4, _ = cardiac_data[2]
    with pytest.raises(InputError):
        trained2d.predict(img4)
    two = Volume(np.zeros((2, 32, 32), np.float32), BRAIN_AFFINE, 2)
    with pytest.raises(InputError):
        trained2d.predict(two)
    with pytest.raises(ValueError):
        config_from_preset("nope")
    assert config_from_preset("nisf-cpu", steps=3).points_per_step == 8192


def test_a_budget_without_a_step_count_trains_until_the_budget_ends():
    for preset in ("nisf-cpu", "nisf-cpu-small"):
        assert config_from_preset(preset).steps == 3000
        assert config_from_preset(preset, budget_minutes=5).steps == OPEN_ENDED_STEPS
        assert config_from_preset(preset, budget_minutes=5, steps=10).steps == 10
        assert config_from_preset(preset, budget_minutes=5, lr_schedule="cosine").steps == 3000
    assert config_from_preset("nisf-paper", budget_minutes=5).steps == NISFConfig().steps


def test_capabilities_curve_and_chosen_settings(trained2d):
    """NISF has the held-out, plane, step-curve and batch capabilities (not MetaSeg's fit
    diagnostics); its steps curve is the validation curve it chose ``infer_steps`` on."""
    for proto in (HeldOutSlices, PlaneRendering, StepCurves, BatchPrediction):
        assert isinstance(trained2d, proto), proto
    assert not isinstance(trained2d, FitDiagnostics)
    assert NISF.continuous_scale and "--scale on the continuous field" in capabilities(NISF)
    curve = trained2d.steps_curve()
    assert curve == [(c["step"], c["dice"]) for c in trained2d.val_curve] and len(curve) == 7
    assert all(isinstance(k, int) and isinstance(d, float) for k, d in curve)
    assert trained2d.chosen_settings() == {"infer_steps": trained2d.infer_steps}
    assert NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2)).steps_curve() == []


def test_logits_probabilities_and_labels_agree(trained2d, brain_data):
    """``logits`` (the base interface) are the field's class scores on the grid of ``scale``:
    their argmax is ``predict``'s labels and their softmax ``predict_probabilities``."""
    img = brain_data[2][0][0]
    logits, affine = trained2d.logits(img, 2)
    assert logits.shape == (5, 64, 64) and logits.dtype == torch.float32
    labels = trained2d.predict(img, 2)
    np.testing.assert_array_equal(logits.argmax(0).numpy(), labels.data)
    np.testing.assert_array_equal(affine, labels.affine)
    probs = trained2d.predict_probabilities(img, 2)
    assert probs.data.shape == (5, 64, 64) and probs.data.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(probs.data), torch.softmax(logits, 0), rtol=0, atol=1e-6)


def test_render_plane_of_fits_the_latent_once_and_renders(trained4d, cardiac_data):
    img, _ = cardiac_data[2]
    centre = img.affine[:3, :3] @ np.array([11.5, 11.5, 1.5]) + img.affine[:3, 3]
    args = (centre, [1, 0, 0], [0, 0.2, 1], (9, 7), 2.0, 1.5)
    via = trained4d.render_plane_of(img, *args)
    direct = trained4d.render_plane(trained4d.fit_latents([img])[0], *args)
    np.testing.assert_array_equal(via.labels, direct.labels)
    np.testing.assert_array_equal(via.image, direct.image)
    np.testing.assert_array_equal(via.affine, direct.affine)
    assert via.frame == 1.5 and via.labels.shape == (9, 7)


def test_one_prior_step_alone(brain_data):
    """The prior's task: a step draws from (seed, step, rank) alone (the same step twice gives
    the same loss), only the drawn cases' latents get a gradient, and its weights round-trip."""
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2, points_per_step=100, subjects_per_step=2))
    task = PriorTraining(model, load_training_subjects(model, brain_data[0][:3]), 3)
    assert task.latents.shape == (3, 16) and bool(task.own.all())
    torch.testing.assert_close(task.latents.detach(), model.initial_train_latents(3), rtol=0, atol=0)
    loss, parts = task.step(4)
    assert loss.requires_grad and set(parts) == {"bce", "dice", "rec"}
    loss.backward()
    moved = task.latents.grad.abs().amax(1) > 0
    assert int(moved.sum()) == 2                          # subjects_per_step of the 3 rows
    again, _ = task.step(4)
    assert torch.equal(again.detach(), loss.detach())
    other, _ = task.step(5)
    assert not torch.equal(other.detach(), loss.detach())
    saved = {k: v.clone() for k, v in task.weights().items()}
    with torch.no_grad():
        task.latents.add_(1.0)
    task.load_weights(saved)
    torch.testing.assert_close(task.latents.detach(), saved["latents"], rtol=0, atol=0)
    with pytest.raises(InputError, match="latents"):
        task.load_weights({**saved, "latents": saved["latents"][:2]})


def test_recipe_presets_and_field_meanings():
    """The registry's recipe: nisf-cpu-small for 2D, 3D and 3D+t data; config_from_preset's
    rule for budgets; every config field has a one-line meaning (``inrseg config nisf``)."""
    assert [RECIPE.default_preset(nd) for nd in (2, 3, 4)] == ["nisf-cpu-small"] * 3
    cfg = RECIPE.make("nisf-cpu-small", 3, {"budget_minutes": 5.0, "augment": 2})
    assert (cfg.width, cfg.depth, cfg.augment, cfg.steps) == (64, 4, 2, OPEN_ENDED_STEPS)
    assert RECIPE.make("nisf-cpu", 2, {"budget_minutes": 5.0, "steps": 10}).steps == 10
    assert RECIPE.make("nisf-paper", 4, {}) == NISFConfig()
    helps = field_help(NISFConfig)
    assert set(helps) == {f.name for f in fields(NISFConfig)}
    assert all(helps.values()), [k for k, v in helps.items() if not v]
    with pytest.raises(InputError):
        RECIPE.make("nisf-cpu", 2, {"activation": "tanh"})


# ------------------------------------------------------------------------------ ignore label


def test_sparse_labels_segmentation_loss_only_where_labelled():
    """With unlabelled points (IGNORE): the segmentation terms are each image's formula on its
    labelled points alone, the reconstruction term covers every point, and the seg logits at
    unlabelled points change neither the loss nor its gradient."""
    model = NISF(BRAIN_NAMES, 2, 1, NISFConfig(width=16, depth=2))
    cfg, C = model.config, len(BRAIN_NAMES)
    g = torch.Generator().manual_seed(1)
    sizes = [9, 14]
    items = []
    for n in sizes:
        lab = torch.randint(0, C, (n,), generator=g)
        lab[torch.rand(n, generator=g) < 0.4] = IGNORE
        items.append((torch.randn(n, C, generator=g), torch.randn(n, 1, generator=g), lab,
                      torch.rand(n, 1, generator=g)))
    lat = torch.randn(2, 16, generator=g)
    seg, rec, lab, inten = (pad_sequence([it[k] for it in items], batch_first=True) for k in range(4))
    w = point_weights(sizes)

    def run(seg_logits):
        s = seg_logits.clone().requires_grad_(True)
        loss, parts = prior_loss(s, rec, lab, inten, w, lat, seg_weights(lab, w), alpha=cfg.alpha,
                                 latent_reg=cfg.latent_reg)
        loss.backward()
        return loss.detach(), parts, s.grad

    loss, parts, grad = run(seg)
    unlabelled = (lab == IGNORE)[..., None].expand_as(seg)
    loss2, _, grad2 = run(torch.where(unlabelled, torch.randn(seg.shape, generator=g) * 10, seg))
    torch.testing.assert_close(loss2, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=1e-7)
    assert (grad[unlabelled] == 0).all()
    wants = []
    for b, (s, r, lb, it) in enumerate(items):
        keep = lb != IGNORE
        p = torch.softmax(s[keep], -1)
        onehot = F.one_hot(lb[keep], C).float()
        inter = (p * onehot).sum(0)
        wants.append(F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), onehot)
                     + 1.0 - ((2 * inter + 1.0) / (p.sum(0) + onehot.sum(0) + 1.0)).mean()
                     + cfg.alpha * F.binary_cross_entropy_with_logits(r, it)       # every point
                     + cfg.latent_reg * lat[b].pow(2).mean())
    torch.testing.assert_close(loss, (wants[0] + wants[1]) / 2)
    # an image with no labelled point: segmentation terms 0, no NaN
    none = torch.full_like(lab, IGNORE)
    loss0, parts0 = prior_loss(seg, rec, none, inten, w, lat, seg_weights(none, w), alpha=cfg.alpha,
                               latent_reg=cfg.latent_reg)
    assert torch.isfinite(loss0) and parts0["bce"] == 0.0 and parts0["dice"] == 0.0


def test_sparse_cine_trains_and_scores_annotated_frames_only():
    """A 3D+t cine labelled in one frame (the rest 255, declared ignore): prior training runs,
    and the steps curve's Dice is the mean over annotated frames (unannotated ones skipped)."""
    pairs = []
    for s in range(3):
        img, lab = cardiac_pair(s)
        sparse = lab.data.copy()
        sparse[..., 1:] = 255
        pairs.append((img, Volume(sparse, lab.affine, 4, time_step=0.05, meta={"ignore_label": 255})))
    model = NISF(CARDIAC_NAMES, 4, 1, NISFConfig(**{**TINY_4D, "steps": 6, "infer_max_steps": 2,
                                                    "curve_every": 1}))
    sub = model.prepare(*pairs[0])
    assert (sub.labels == IGNORE).sum() == 24 * 24 * 4 * 3
    model.fit(pairs[:2], pairs[2:])
    assert all(np.isfinite(h["loss"]) for h in model.history if "loss" in h)
    assert len(model.val_curve) == 3 and all(np.isfinite(c["dice"]) for c in model.val_curve)


def test_sparse_cine_draws_annotated_frames_more_often():
    """A cine labelled in one frame of 4: with ``annotated_frame_fraction`` f the annotated frame
    is drawn with probability f + (1 - f) / T; the draws are a pure function of (seed, step,
    rank); a fully labelled case (and f = 0) draws exactly as uniform sampling always did."""
    img, lab = cardiac_pair(0)
    sparse = lab.data.copy()
    sparse[..., [0, 1, 3]] = 255
    sparse_lab = Volume(sparse, lab.affine, 4, time_step=0.05, meta={"ignore_label": 255})
    cfg = dict(width=16, depth=2, points_per_step=64)

    def draws(fraction, labels, steps=range(400)):
        model = NISF(CARDIAC_NAMES, 4, 1, NISFConfig(**cfg, annotated_frame_fraction=fraction))
        sub = model.prepare(img, labels)
        frames = annotated_frames(sub)
        return frames, [sample_points(sub, step_rng(0, i, 0), model.config, frames) for i in steps]

    frames, half = draws(0.5, sparse_lab)
    assert frames.tolist() == [2]
    hit = np.mean([bool((s[2] != IGNORE).any()) for s in half])
    assert 0.55 < hit < 0.70                                # expected 0.5 + 0.5 / 4 = 0.625
    _, again = draws(0.5, sparse_lab)                       # pure function of (seed, step, rank)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(half, again))
    _, always = draws(1.0, sparse_lab, range(50))
    assert all((s[2] != IGNORE).any() for s in always)
    # no ignored voxel: no annotated-frame draw at all, whatever the fraction
    dense_frames, dense = draws(0.5, lab, range(50))
    assert dense_frames is None
    _, dense1 = draws(1.0, lab, range(50))
    _, sparse0 = draws(0.0, sparse_lab, range(50))
    for a, b, c in zip(dense, dense1, sparse0):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[0], c[0], rtol=0, atol=0)
    # the draws of uniform sampling, written out: a frame, then the voxels of that frame
    rng = step_rng(0, 7, 0)
    t = int(rng.integers(4))
    pick = rng.choice(24 * 24 * 4, size=64, replace=False)
    model = NISF(CARDIAC_NAMES, 4, 1, NISFConfig(**cfg))
    sub = model.prepare(img, lab)
    want = sub.coords[torch.arange(t, sub.coords.shape[0], 4)[torch.from_numpy(pick)]]
    torch.testing.assert_close(dense[7][0], want, rtol=0, atol=1e-3)   # up to the coordinate jitter
