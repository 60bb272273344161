"""2D methods on 3D volumes, slice by slice (``METHOD@2d``; :mod:`inrseg.data.slices`,
:mod:`inrseg.methods.slicewise`)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_blobs
from inrseg.cli import train as train_cli
from inrseg.core.errors import InputError
from inrseg.data.layouts import open_dataset
from inrseg.data.slices import choose_slice_axis, slice_affine, slice_cases, slice_of, stack_slices
from inrseg.data.splits import split_by_subject
from inrseg.data.volume import Volume
from inrseg.eval.bench import build_segmenter
from inrseg.methods.registry import load_segmenter, parse_spec
from inrseg.methods.slicewise import SliceWise


@settings(max_examples=40, deadline=None)
@given(axis=st.integers(0, 2), index=st.integers(0, 6), seed=st.integers(0, 1000))
def test_a_slice_overlays_its_volume(axis, index, seed):
    """Voxel (i, j) of slice k maps to the world point of the volume voxel with k inserted at
    the slice axis (a random affine, every axis)."""
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, :4] = rng.normal(size=(3, 4))
    sl = slice_affine(affine, axis, index)
    for _ in range(5):
        ij = rng.integers(0, 9, size=2)
        vox = np.insert(ij.astype(float), axis, index)
        np.testing.assert_allclose(sl @ np.r_[ij, 0.0, 1.0], affine @ np.r_[vox, 1.0], atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_stack_back_to_the_volume(axis):
    rng = np.random.default_rng(axis)
    vol = Volume(rng.normal(size=(2, 4, 5, 6)).astype(np.float32), np.diag([1.0, 2.0, 3.0, 1.0]), 3)
    slices = [slice_of(vol, axis, k) for k in range(vol.shape[axis])]
    assert all(s.spatial_ndim == 2 and s.data.shape[0] == 2 for s in slices)
    assert np.array_equal(stack_slices([s.data for s in slices], axis), vol.data)


def _volumes(tmp_path, spacing, shape=(24, 24, 6), n=6):
    root = write_blobs(tmp_path / "d", n=n, shape=shape)
    for f in list((root / "imagesTr").glob("*.nii.gz")) + list((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(str(f))
        out = nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([*spacing, 1.0]))
        nib.save(out, str(f))
    return open_dataset(root)


@pytest.mark.parametrize("spacing,shape,axis", [((1.5, 1.5, 10.0), (24, 24, 6), 2),
                                                ((8.0, 1.0, 1.0), (6, 24, 24), 0),
                                                ((1.0, 1.0, 1.0), (24, 6, 24), 1)])
def test_choose_slice_axis(tmp_path, spacing, shape, axis):
    ds = _volumes(tmp_path, spacing, shape)
    assert choose_slice_axis(ds.train) == axis


def test_slices_keep_their_subject_and_empty_slices_stay_background(tmp_path):
    ds = _volumes(tmp_path, (1.5, 1.5, 10.0))
    train, val = split_by_subject(ds.train, 0.34, 0)
    tr, va = slice_cases(train, 2), slice_cases(val, 2)
    assert len(tr) == 6 * len(train) and {c.subject_id for c in tr} == {c.subject_id for c in train}
    assert not {c.subject_id for c in tr} & {c.subject_id for c in va}
    image, labels = tr[0].load()
    vol_img, vol_lab = train[0].load()
    assert np.array_equal(image.data, vol_img.data[:, :, :, 0]) and np.array_equal(labels.data, vol_lab.data[..., 0])
    assert tr[0].grid_shape() == (24, 24)


@pytest.mark.parametrize("spec", ["unet@2d", "morse:baseline:unet@2d", "metaseg@2d", "nisf@2d"])
def test_every_2d_method_segments_volumes_slice_by_slice(spec, tmp_path, cli):
    """Trained by `inrseg train SPEC` on 3D volumes, saved, loaded back as slice-wise; a volume's
    labels are the stack of the 2D model's labels of its slices, on the volume's grid and affine;
    `inrseg segment` writes a 3D label map."""
    ds = _volumes(tmp_path, (1.5, 1.5, 10.0), shape=(32, 32, 4), n=4)
    out = tmp_path / "m.safetensors"
    quick = {"unet@2d": ["--steps", "2"], "morse:baseline:unet@2d": ["--steps", "2"],
             "metaseg@2d": ["--steps", "2", "--set", "phase2_steps=2", "--set", "inner_steps=1"],
             "nisf@2d": ["--steps", "2", "--set", "infer_max_steps=2"]}[spec]
    res = cli("train", spec, "--data", ds.root, "--out", out, "--device", "cpu", *quick)
    assert res.code == 0, res.err
    assert "training slices of" in res.err
    model = load_segmenter(out)
    assert isinstance(model, SliceWise) and model.slice_axis == 2 and model.inner.spatial_ndim == 2
    image, labels = ds.train[0].load()
    torch.manual_seed(0)
    pred = model.predict(image)
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    if spec in ("unet@2d", "morse:baseline:unet@2d"):  # deterministic inner predictions: compare per slice
        ref = np.stack([model.inner.predict(slice_of(image, 2, k)).data for k in range(image.shape[2])], axis=2)
        assert np.array_equal(pred.data, ref)
        members = model.tta_members()
        assert len(members) == 4  # in-plane mirrorings of the 2D model
        logits, affine = members[0].logits(image)
        assert tuple(logits.shape) == (ds.num_classes, *image.shape) and np.allclose(affine, image.affine)
    seg = tmp_path / "seg"
    res = cli("segment", "--model", out, "--input", ds.train[0].image_paths[0], "--output", seg, "--device", "cpu")
    assert res.code == 0, res.err
    written = nib.load(str(next(seg.glob("*.nii.gz"))))
    assert written.shape == image.shape and np.allclose(written.affine, image.affine)


def test_at_2d_is_refused_where_it_cannot_apply(tmp_path, cli):
    with pytest.raises(InputError, match="unknown mode"):
        parse_spec("unet@3d")
    ds2 = open_dataset(write_blobs(tmp_path / "d2", n=4))
    res = cli("train", "unet@2d", "--data", ds2.root, "--out", tmp_path / "m.safetensors", "--steps", "1")
    assert res.code != 0 and "segments 3D volumes slice by slice" in res.err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("spec", ["unet@2d", "morse@2d", "metaseg@2d", "nisf@2d"])
def test_train_and_bench_build_the_same_slicewise_model(spec, tmp_path, monkeypatch):
    ds = _volumes(tmp_path, (1.5, 1.5, 10.0), shape=(32, 32, 4), n=4)
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, *a, **k):
        seen["m"] = model
        raise Stop

    monkeypatch.setattr(train_cli, "fit_and_save", capture)
    with pytest.raises(Stop):
        train_cli.train_model(spec, ds.root, tmp_path / "m.safetensors", budget_minutes=3.0, seed=1, device="cpu")
    benched = build_segmenter(parse_spec(spec), ds, 1, 3.0, torch.device("cpu"))
    trained = seen["m"]
    assert isinstance(trained, SliceWise) and isinstance(benched, SliceWise)
    assert type(trained.inner) is type(benched.inner)
    assert dataclasses.asdict(trained.config) == dataclasses.asdict(benched.config)
    assert trained.num_params == benched.num_params
