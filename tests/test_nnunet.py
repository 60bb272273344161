"""nnU-Net v2 as an inrseg method (``inrseg.methods.nnunet``).

The checks that run nnU-Net itself carry the ``nnunet`` marker and are skipped where the
``inrseg[nnunet]`` extra is not installed (the default suite); run them with
``pytest -m nnunet`` in an environment with it (docs/testing.md says how). The plan surgery, the
config and the missing-extra error run everywhere.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_blobs
from inrseg.core.errors import InputError
from inrseg.data.layouts import open_dataset
from inrseg.data.splits import split_by_subject
from inrseg.data.volume import Volume
from inrseg.engine import Budget
from inrseg.methods.nnunet import segmenter as nnunet_segmenter
from inrseg.methods.nnunet.workspace import SLICE_SPACING_2D, cpu_plan, from_nnunet, nnunet_affine, to_nnunet
from inrseg.methods.registry import load_segmenter, resolve

HAVE_NNUNET = nnunet_segmenter.nnunet_available()
needs_nnunet = [pytest.mark.nnunet,
                pytest.mark.skipif(not HAVE_NNUNET, reason="needs the inrseg[nnunet] extra (nnunetv2)")]

TINY = {"epochs": 2, "iterations_per_epoch": 3, "val_iterations_per_epoch": 2}


# ------------------------------------------------------------------ without nnU-Net
def test_cpu_plan_inherits_nnunets_configuration_with_batch_and_widths_reduced():
    plans = {"configurations": {"2d": {"batch_size": 56, "patch_size": [256, 224], "architecture": {
        "network_class_name": "PlainConvUNet", "arch_kwargs": {"features_per_stage": [32, 64, 128, 256, 512, 512],
                                                               "n_stages": 6}}}}}
    out, name = cpu_plan(plans, "2d", batch_size=8, width_divisor=2)
    assert name == "2d_cpu"
    conf = out["configurations"][name]
    assert conf["inherits_from"] == "2d" and conf["batch_size"] == 8
    assert conf["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 256, 256]
    assert conf["architecture"]["arch_kwargs"]["n_stages"] == 6  # the topology is nnU-Net's
    assert "patch_size" not in conf  # inherited: the same preprocessed data and patch
    assert plans["configurations"]["2d"]["batch_size"] == 56  # the input plans are not edited
    assert cpu_plan(plans, "2d", 2, 64)[0]["configurations"]["2d_cpu"]["architecture"]["arch_kwargs"][
        "features_per_stage"][0] == 8  # never below 8 features


def test_presets_and_2d_data():
    assert resolve("nnunet:2d-cpu", 3)[1].plan == "cpu"
    assert resolve("nnunet", 3)[1].configuration == "3d_fullres"
    assert resolve("nnunet", 2)[1].configuration == "2d"
    with pytest.raises(InputError, match="2d configuration only"):
        resolve("nnunet:3d_fullres", 2)
    assert "CPU plan (batch 8, widths / 2" in resolve("nnunet:2d-cpu", 3)[1].plan_name


def test_axis_order_round_trips_and_2d_gets_a_coarse_slice_axis():
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(size=(2, 5, 6, 7)).astype(np.float32), np.diag([1.0, 2.0, 3.0, 1.0]), 3)
    arr, props = to_nnunet(vol)
    assert arr.shape == (2, 7, 6, 5) and props["spacing"] == [3.0, 2.0, 1.0]
    assert np.array_equal(from_nnunet(arr, 3), vol.data)
    sl = Volume(rng.normal(size=(1, 5, 6)).astype(np.float32), np.diag([1.5, 1.5, 1.0, 1.0]), 2)
    arr2, props2 = to_nnunet(sl)
    assert arr2.shape == (1, 1, 6, 5) and props2["spacing"] == [SLICE_SPACING_2D, 1.5, 1.5]
    assert np.array_equal(from_nnunet(arr2, 2), sl.data)
    assert np.allclose(nnunet_affine(sl)[:3, :2], sl.affine[:3, :2])  # in-plane geometry kept


def test_without_the_extra_fit_names_it(tmp_path, monkeypatch):
    data = write_blobs(tmp_path / "d", n=4)
    ds = open_dataset(data)
    e, cfg = resolve("nnunet", 2)
    model = e.cls(ds.label_names, 2, 1, cfg)
    monkeypatch.setattr(nnunet_segmenter, "nnunet_available", lambda: False)
    with pytest.raises(InputError, match=r"inrseg\[nnunet\]"):
        model.fit(ds.train[:2], ds.train[2:])


# ------------------------------------------------------------------ nnU-Net itself
@pytest.mark.nnunet
@pytest.mark.parametrize("nd", [2, 3])
def test_nnunet_reads_what_the_adapter_hands_it(nd, tmp_path):
    """The arrays inrseg hands nnU-Net's predictor are what nnU-Net's own reader (NibabelIO, the
    one the raw dataset names) makes of the training files: same axes, values and spacing."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from inrseg.data.nifti import save_image
    rng = np.random.default_rng(nd)
    shape = (9, 7) if nd == 2 else (9, 7, 5)
    vol = Volume(rng.normal(size=(1, *shape)).astype(np.float32), np.diag([1.2, 1.4, 2.5, 1.0]), nd)
    path = tmp_path / "x_0000.nii.gz"
    save_image(vol.with_data(vol.data, nnunet_affine(vol)), path)
    theirs, props = NibabelIO().read_images([str(path)])
    ours, our_props = to_nnunet(vol)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)
    np.testing.assert_allclose(props["spacing"], our_props["spacing"], rtol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch nnU-Net of each configuration on tiny blobs (2D) and a tiny 3D phantom."""
    if not HAVE_NNUNET:
        pytest.skip("needs the inrseg[nnunet] extra (nnunetv2)")
    out = {}
    root = tmp_path_factory.mktemp("nn")
    for nd, spec in ((2, "nnunet:2d-cpu"), (3, "nnunet:3d_fullres-cpu")):
        data = write_blobs(root / f"d{nd}", n=6, shape=(32, 32) if nd == 2 else (24, 24, 16))
        ds = open_dataset(data)
        train, val = split_by_subject(ds.train, 0.34, 0)
        e, cfg = resolve(spec, ds.spatial_ndim, options=TINY)
        model = e.cls(ds.label_names, ds.spatial_ndim, 1, cfg, device="cpu")
        env = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        threads = torch.get_num_threads()
        model.fit(train, val, budget=Budget(5), log_path=root / f"log{nd}.jsonl")
        out[nd] = (model, ds, val, env, threads, root / f"log{nd}.jsonl")
    return out


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.nnunet
def test_nnunet_trains_predicts_and_round_trips(nd, trained, tmp_path):
    model, ds, val, env, threads, log = trained[nd]
    assert model.iterations_trained == 6 and model.epochs_trained == 2
    assert model.nnunet_configuration.endswith("_cpu")
    assert model.nnunet_plans["configurations"][model.nnunet_configuration]["batch_size"] == 8
    # nnU-Net's folders were temporary and its environment variables are back
    assert {k: os.environ.get(k) for k in env} == env
    assert torch.get_num_threads() == threads
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6] and all("val_ema_pseudo_dice" in r for r in lines)
    assert model.best_step in (3, 6)
    image, labels = val[0].load()
    pred = model.predict(image)
    assert pred.shape == labels.shape and np.array_equal(pred.affine, image.affine)
    probs = model.predict_probabilities(image).data
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert np.array_equal(probs.argmax(0), pred.data)
    path = tmp_path / "m.safetensors"
    model.save(path)
    again = load_segmenter(path)
    np.testing.assert_allclose(again.predict_probabilities(image).data, probs, atol=1e-6)
    with pytest.raises(InputError, match="input grid"):
        model.predict(image, scale=2.0)


@pytest.mark.nnunet
def test_nnunet_stops_at_the_deadline(tmp_path):
    if not HAVE_NNUNET:
        pytest.skip("needs the inrseg[nnunet] extra (nnunetv2)")
    ds = open_dataset(write_blobs(tmp_path / "d", n=6))
    train, val = split_by_subject(ds.train, 0.34, 0)
    e, cfg = resolve("nnunet:2d-cpu", 2, options={"epochs": 10 ** 6, "iterations_per_epoch": 5,
                                                 "val_iterations_per_epoch": 1})
    model = e.cls(ds.label_names, 2, 1, cfg)
    t = time.perf_counter()
    model.fit(train, val, budget=Budget(0.75))
    took = time.perf_counter() - t
    assert took < 0.75 * 60 + 20, f"fit took {took:.0f} s of a 45 s budget"
    assert 0 < model.iterations_trained < 10 ** 6
