"""Augmented copies (inrseg.data.augment) and NISF's per-copy latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrseg.data.augment import augmented_pair, copy_seed
from inrseg.data.volume import Volume
from inrseg.data.phantoms.brain import brain_phantom
from inrseg.methods.nisf import NISF, NISFConfig


def _pair2d(seed: int = 0) -> tuple[Volume, Volume]:
    img, lab = brain_phantom((32, 32), seed)
    aff = np.diag([2.0, 2.0, 1.0, 1.0])
    return Volume(img[None], aff, 2), Volume(lab.astype(np.int64), aff, 2, meta={"ignore_label": 9})


def _stack(spacing: tuple[float, float, float], frames: int | None = None) -> tuple[Volume, Volume]:
    """A 3D (or 3D + t) grid whose 6 slices (last spatial axis) are all the same 2D phantom."""
    img2, lab2 = brain_phantom((24, 24), 3)
    img = np.repeat(img2[:, :, None], 6, axis=2)
    lab = np.repeat(lab2[:, :, None], 6, axis=2).astype(np.int16)
    aff = np.diag([*spacing, 1.0])
    nd = 3
    if frames:
        img, lab, nd = np.repeat(img[..., None], frames, -1), np.repeat(lab[..., None], frames, -1), 4
    return Volume(img[None].astype(np.float32), aff, nd), Volume(lab, aff, nd)


def test_a_copy_is_a_function_of_its_seed_and_keeps_grid_labels_and_meta():
    img, lab = _pair2d()
    lab.data[:3] = 9                                    # an ignore band: it must survive as 9
    a, b, c = (augmented_pair(img, lab, s) for s in (copy_seed(0, 1, 1), copy_seed(0, 1, 1), copy_seed(0, 1, 2)))
    assert np.array_equal(a[0].data, b[0].data) and np.array_equal(a[1].data, b[1].data)
    assert not np.array_equal(a[1].data, c[1].data)     # another copy moves differently
    for im, lb in (a, c):
        assert im.data.shape == img.data.shape and im.data.dtype == np.float32
        assert lb.data.shape == lab.data.shape and lb.data.dtype == lab.data.dtype
        assert np.array_equal(im.affine, img.affine) and lb.meta == {"ignore_label": 9}
        assert set(np.unique(lb.data)) <= set(np.unique(lab.data))        # nearest: no new values
        assert 9 in set(np.unique(lb.data))
        changed = float((lb.data != lab.data).mean())
        assert 0.005 < changed < 0.3                    # small, real deformation
    assert len({copy_seed(0, i, c) for i in range(20) for c in range(1, 6)}) == 100


def test_without_geometry_the_labels_stay_and_intensities_keep_their_order():
    img, lab = _pair2d(1)
    im, lb = augmented_pair(img, lab, 7, rotate=0.0, scale=0.0)
    assert np.array_equal(lb.data, lab.data)
    x, y = img.data.ravel(), im.data.ravel()
    assert not np.allclose(x, y)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(y[order]) >= -1e-5)           # gain and gamma are monotone


@pytest.mark.parametrize("elastic", [0.0, 2.0])
@pytest.mark.parametrize("frames", [None, 3])
def test_thick_slices_rotate_in_plane_only(frames, elastic):
    """Slices 8 mm apart, pixels 1 mm: a copy of identical slices has identical slices (no tilt
    or deformation across slices), and in a cine every frame moves alike. The same grid at 1 mm
    isotropic does tilt (so the check can fail)."""
    img, lab = _stack((1.0, 1.0, 8.0), frames)
    copies = [augmented_pair(img, lab, seed, rotate=0.5, scale=0.0, elastic=elastic) for seed in range(4)]
    assert any(not np.array_equal(lb.data, lab.data) for _, lb in copies)
    for im, lb in copies:
        for z in range(1, 6):
            assert np.array_equal(lb.data[:, :, z], lb.data[:, :, 0])
            np.testing.assert_allclose(im.data[:, :, :, z], im.data[:, :, :, 0], atol=1e-5)
        if frames:
            for t in range(1, frames):
                assert np.array_equal(lb.data[..., t], lb.data[..., 0])
                np.testing.assert_allclose(im.data[..., t], im.data[..., 0], atol=1e-5)
    img, lab = _stack((1.0, 1.0, 1.0), frames)
    tilted = [augmented_pair(img, lab, seed, rotate=0.5, scale=0.0, elastic=elastic)[1].data for seed in range(4)]
    assert any(not np.array_equal(lb[:, :, z], lb[:, :, 0]) for lb in tilted for z in range(1, 6))


def test_nisf_gives_every_copy_its_own_latent():
    """``augment=2``: 3 cases become 9 latent rows (cases, then copies), every row trained; the
    cases' rows are not what a run without copies trains (the copies share the network)."""
    train = [_pair2d(s) for s in range(3)]
    base = dict(width=16, depth=2, steps=20, lr=3e-3, infer_steps=1, points_per_step=256,
                subjects_per_step=3)
    aug = NISF(["bg", "a", "b", "c", "d"], 2, 1, NISFConfig(augment=2, **base))
    aug.fit(train)
    plain = NISF(["bg", "a", "b", "c", "d"], 2, 1, NISFConfig(**base))
    plain.fit(train)
    init = aug.initial_train_latents(9)
    assert aug.train_latents.shape == (9, aug.config.latent_dim)
    moved = (aug.train_latents - init).abs().amax(1)
    assert bool((moved > 1e-4).all()), moved
    assert not torch.allclose(aug.train_latents[:3], plain.train_latents, atol=1e-6)
    with pytest.raises(ValueError, match="augment"):
        NISFConfig(augment=-1)


def test_translate_moves_the_anatomy_in_plane_and_keeps_its_size():
    img, lab = _pair2d(2)
    fg = lab.data > 0
    centre = np.argwhere(fg).mean(0)
    shifts = []
    for seed in range(4):
        _, lb = augmented_pair(img, lab, seed, rotate=0.0, scale=0.0, translate=0.2)
        moved = lb.data > 0
        assert abs(int(moved.sum()) - int(fg.sum())) <= 0.1 * fg.sum()     # a shift, not a resize
        shifts.append(np.abs(np.argwhere(moved).mean(0) - centre).max())
    assert max(shifts) >= 1.5                                             # up to 0.2 x 32 voxels
    assert max(shifts) <= 0.2 * 32 + 1
    _, same = augmented_pair(img, lab, 0, rotate=0.0, scale=0.0, translate=0.0)
    assert np.array_equal(same.data, lab.data)


def _displacement(shape: tuple[int, ...], spacing: tuple[float, ...], elastic: float, seed: int) -> np.ndarray:
    """The displacement field ``(d, *S)`` (voxels) of a copy without rotation or scaling, read
    off label maps that hold each voxel's index along one axis (nearest neighbour: exact to the
    voxel)."""
    nd = len(shape)
    aff = np.diag([*spacing, 1.0])
    out = []
    for ax in range(nd):
        index = np.arange(shape[ax]).reshape([-1 if i == ax else 1 for i in range(nd)])
        lab = np.broadcast_to(index, shape).astype(np.int16).copy()
        img = Volume(np.zeros((1, *shape), np.float32), aff, nd)
        _, moved = augmented_pair(img, Volume(lab, aff, nd), seed, rotate=0.0, scale=0.0, elastic=elastic)
        out.append(moved.data.astype(np.float64) - lab)
    return np.stack(out)


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 28)])
def test_elastic_copies_are_smooth_fields_of_the_requested_size(shape):
    """``elastic = e``: away from the borders the displacement along each axis has an RMS of
    about e voxels (2D: MONAI's control-point offsets; 3D: the Gaussian-smoothed field,
    calibrated), and it is smooth: neighbours move alike (white noise of that size would not)."""
    e = 3.0
    inner = (slice(None),) + tuple(slice(n // 8, n - n // 8) for n in shape)
    rms = []
    for seed in range(3):
        d = _displacement(shape, (1.0,) * len(shape), e, seed)[inner]
        rms.append(float(np.sqrt((d ** 2).mean())))
        steps = [np.abs(np.diff(d, axis=1 + a)).mean() for a in range(len(shape))]
        assert max(steps) < 0.25 * e, steps                 # white noise: ~1.6 e
    assert 0.6 * e < np.mean(rms) < 1.6 * e, rms
    assert not np.any(_displacement(shape, (1.0,) * len(shape), 0.0, 0))
    with pytest.raises(ValueError, match="elastic"):
        augmented_pair(*_pair2d(), 0, elastic=-1.0)


def test_elastic_moves_image_and_labels_alike():
    """The image is the label map as intensities: after an elastic copy the labels sit on their
    own intensities except at the bilinear image's blurred borders; the image of another copy
    (another field) disagrees with them on well over twice as many pixels."""
    img0, lab0 = brain_phantom((64, 64), 4)
    aff = np.eye(4)
    labels = Volume(lab0.astype(np.int64), aff, 2)
    img = Volume(lab0[None].astype(np.float32) * 10.0 + 5.0, aff, 2)

    def mismatch(im: Volume, lb: Volume, monotone: bool = False) -> float:
        classes = np.unique(lb.data)
        centre = np.array([np.median(im.data[0][lb.data == k]) for k in classes])
        assert not monotone or np.all(np.diff(centre) > 0)        # the intensity map's order kept
        nearest = classes[np.abs(im.data[0][..., None] - centre).argmin(-1)]
        return float((nearest != lb.data).mean())

    for seed in range(3):
        im, lb = augmented_pair(img, labels, seed, rotate=0.2, scale=0.1, elastic=2.0)
        other, _ = augmented_pair(img, labels, seed + 10, rotate=0.2, scale=0.1, elastic=2.0)
        assert not np.array_equal(lb.data, labels.data)
        assert mismatch(im, lb, monotone=True) < 0.5 * mismatch(other, lb)
