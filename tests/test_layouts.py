"""Dataset layouts (nnU-Net, neurite-OASIS, UK Biobank) and subject-wise splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA, write_nnunet
from inrseg.core.errors import InputError
from inrseg.data.cases import Case
from inrseg.data.layouts import case_id_of, detect_layout, image_files, load_oasis, load_ukbb, open_dataset
from inrseg.data.nifti import save_image, save_labels
from inrseg.data.splits import split_by_subject, subject_of
from inrseg.data.volume import IGNORE, Volume, label_array
from inrseg.metrics import annotation_stats


def test_subject_rule():
    assert subject_of("sub01_cor+00") == "sub01"
    assert subject_of("pat0003_z060") == "pat0003"
    assert subject_of("sub01") == "sub01"


def test_nnunet_tiny_multichannel(tmp_path):
    root = write_nnunet(tmp_path / "ds", n=3, channels=2)
    ds = open_dataset(root)
    assert ds.layout == "nnunet" and ds.spatial_ndim == 2 and ds.channel_names == ["ch0", "ch1"]
    assert [c.case_id for c in ds.train] == ["sub00_s0", "sub01_s0", "sub02_s0"]
    img, lab = ds.train[0].load()
    assert img.data.shape == (2, 24, 20) and lab.data.shape == (24, 20)
    assert img.spacing == pytest.approx((1.5, 1.5))


@pytest.mark.parametrize("name", ["brain2d-seg4", "brain2d-seg24", "brain3d-seg4", "brats2d", "brats3d"])
def test_every_shared_dataset_loads(name):
    root = SHARED_DATA / name
    if not root.exists():
        pytest.skip(f"benchmark data not found at {root} (../shared/data is only on project machines)")
    ds = open_dataset(root)
    readme = {"brain2d-seg4": (75, 25, 5, 2), "brain2d-seg24": (75, 25, 25, 2), "brain3d-seg4": (15, 5, 5, 3),
              "brats2d": (75, 33, 5, 2), "brats3d": (4, 2, 5, 3)}[name]
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.spatial_ndim) == readme
    # train and test never share a subject
    assert not {c.subject_id for c in ds.train} & {c.subject_id for c in ds.test}
    for case in (ds.train[0], ds.test[-1]):
        img, lab = case.load()
        assert img.data.shape[0] == len(ds.channel_names) and img.shape == lab.shape
        assert np.isfinite(img.data).all() and lab.data.max() < ds.num_classes
    tr, va = split_by_subject(ds.train, 0.2, seed=0)
    assert len(tr) + len(va) == len(ds.train) and va
    assert not {c.subject_id for c in tr} & {c.subject_id for c in va}


def _oasis_subject(root, name, rng):
    d = root / name
    img2 = Volume(np.zeros((16, 12), np.int64), np.eye(4), 2)
    save_image(rng.random((16, 12)).astype(np.float32), d / "slice_norm.nii.gz", like=img2)
    save_labels(rng.integers(0, 5, (16, 12)), d / "slice_seg4.nii.gz", like=img2)
    save_labels(rng.integers(0, 25, (16, 12)), d / "slice_seg24.nii.gz", like=img2)
    img3 = Volume(np.zeros((8, 10, 12), np.int64), np.eye(4), 3)
    save_image(rng.random((8, 10, 12)).astype(np.float32), d / "aligned_norm.nii.gz", like=img3)
    save_labels(rng.integers(0, 5, (8, 10, 12)), d / "aligned_seg4.nii.gz", like=img3)
    save_labels(rng.integers(0, 36, (8, 10, 12)), d / "aligned_seg35.nii.gz", like=img3)


def test_neurite_oasis_layout(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        _oasis_subject(tmp_path, f"OASIS_OAS1_{i:04d}_MR1", rng)
    assert detect_layout(tmp_path) == "oasis"
    ds2 = load_oasis(tmp_path, dim=2, seg="seg24")
    assert ds2.num_classes == 25 and ds2.spatial_ndim == 2 and len(ds2.train) == 4
    img, lab = ds2.train[0].load()
    assert img.shape == (16, 12) and lab.data.max() <= 24
    ds3 = open_dataset(tmp_path, oasis_dim=3, oasis_seg="seg35")
    img, lab = ds3.train[1].load()
    assert img.shape == (8, 10, 12) and ds3.num_classes == 36
    # a splits JSON moves subjects into the test split
    splits = tmp_path.parent / "splits.json"
    splits.write_text(json.dumps({"test": ["OASIS_OAS1_0003_MR1"], "val": ["OASIS_OAS1_0000_MR1"]}))
    ds = open_dataset(tmp_path, splits_file=splits)
    assert [c.case_id for c in ds.test] == ["OASIS_OAS1_0003_MR1"]
    tr, va = split_by_subject(ds.train, splits_file=splits)
    assert [c.subject_id for c in va] == ["OASIS_OAS1_0000_MR1"] and len(tr) == 2


def test_ukbb_layout(tmp_path):
    rng = np.random.default_rng(1)
    aff = np.diag([1.8, 1.8, 8.0, 1.0])
    for i in range(2):
        like = Volume(np.zeros((12, 10, 4, 6), np.int64), aff, 4, time_step=0.04)
        save_image(rng.random((12, 10, 4, 6)).astype(np.float32), tmp_path / f"{i:07d}" / "sa.nii.gz", like=like)
        save_labels(rng.integers(0, 4, (12, 10, 4, 6)), tmp_path / f"{i:07d}" / "seg_sa.nii.gz", like=like)
    assert detect_layout(tmp_path) == "ukbb"
    ds = load_ukbb(tmp_path)
    assert ds.spatial_ndim == 4 and ds.label_names[1] == "lv-blood-pool"
    img, lab = ds.train[0].load()
    assert img.data.shape == (1, 12, 10, 4, 6) and lab.shape == (12, 10, 4, 6)
    assert img.spacing == pytest.approx((1.8, 1.8, 8.0)) and img.time_step == pytest.approx(0.04)


def test_split_by_subject_keeps_slices_together():
    cases = [Case(f"sub{s:02d}_cor{k}", f"sub{s:02d}", ()) for s in range(10) for k in range(5)]
    tr, va = split_by_subject(cases, 0.2, seed=3)
    assert len({c.subject_id for c in va}) == 2 and len(va) == 10
    assert not {c.subject_id for c in tr} & {c.subject_id for c in va}
    assert split_by_subject(cases, 0.2, seed=3) == (tr, va)  # deterministic


def test_subject_map_override(tmp_path):
    root = write_nnunet(tmp_path / "ds", n=4)
    splits = tmp_path / "s.json"
    splits.write_text(json.dumps({"subjects": {"sub00_s0": "X", "sub01_s0": "X"}}))
    ds = open_dataset(root, splits_file=splits)
    assert [c.subject_id for c in ds.train] == ["X", "X", "sub02", "sub03"]


def test_image_files_groups_channels(tmp_path):
    root = write_nnunet(tmp_path / "ds", n=2, channels=2)
    groups = image_files(root / "imagesTr")
    assert [len(g) for g in groups] == [2, 2] and groups[0][1].name == "sub00_s0_0001.nii.gz"


# ----------------------------------------------------------------------------- ignore label, UK Biobank


@pytest.mark.parametrize("style", ["top-level", "nnunet-v2"])
def test_ignore_label_from_dataset_json(tmp_path, style):
    root = write_nnunet(tmp_path / "ds", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    if style == "top-level":
        meta["ignore"] = 255
        value = 255
    else:
        meta["labels"]["ignore"] = 3  # nnU-Net v2: the highest label value, not a class
        value = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    lab_path = root / "labelsTr" / "sub00_s0.nii.gz"
    like = Volume(np.zeros((24, 20), np.int64), np.diag([1.5, 1.5, 1.0, 1.0]), 2)
    lab = np.zeros((24, 20), np.int64)
    lab[:5] = value
    lab[10, 10] = 2
    save_labels(lab, lab_path, like=like)
    ds = open_dataset(root)
    assert ds.label_names == ["background", "a", "b"] and ds.ignore_label == value
    assert ds.info()["ignore_label"] == value and ds.train[0].ignore_label == value
    _, labels = ds.train[0].load()
    assert labels.meta["ignore_label"] == value and (labels.data == value).sum() == 100
    assert (label_array(labels) == IGNORE).sum() == 100 and label_array(labels).max() == 2


def test_ignore_label_errors(tmp_path):
    root = write_nnunet(tmp_path / "ds", n=1)
    meta = json.loads((root / "dataset.json").read_text())
    for bad in (1, -3, "x"):  # a class value, negative, not a number
        (root / "dataset.json").write_text(json.dumps({**meta, "ignore": bad}))
        with pytest.raises(InputError):
            open_dataset(root)
    # without the ignore value declared, 255 in a label map is refused
    like = Volume(np.zeros((24, 20), np.int64), np.diag([1.5, 1.5, 1.0, 1.0]), 2)
    save_labels(np.full((24, 20), 255), root / "labelsTr" / "sub00_s0.nii.gz", like=like)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"\[255\] are not in the dataset's labels"):
        open_dataset(root).train[0].load()


def test_ukbb_train_test_folders_dataset_json_and_segment_inputs(tmp_path):
    rng = np.random.default_rng(2)
    like = Volume(np.zeros((8, 8, 3, 2), np.int64), np.diag([1.8, 1.8, 8.0, 1.0]), 4, time_step=0.04)
    for split, subjects in (("train", ["s1", "s2"]), ("test", ["s3"])):
        for s in subjects:
            save_image(rng.random((8, 8, 3, 2)).astype(np.float32), tmp_path / split / s / "sa.nii.gz", like=like)
            lab = rng.integers(0, 3, (8, 8, 3, 2))
            lab[..., 1] = 255
            save_labels(lab, tmp_path / split / s / "seg_sa.nii.gz", like=like)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "cine", "ignore": 255,
                                                      "labels": {"background": 0, "lv": 1, "myo": 2}}))
    assert detect_layout(tmp_path) == "ukbb"
    ds = open_dataset(tmp_path)
    assert [c.case_id for c in ds.train] == ["s1", "s2"] and [c.case_id for c in ds.test] == ["s3"]
    assert ds.label_names == ["background", "lv", "myo"] and ds.ignore_label == 255 and ds.name == "cine"
    assert open_dataset(tmp_path / "train").ignore_label == 255  # dataset.json of the parent
    ds.test[0].load()
    # segment inputs: a folder of subjects, one subject folder, one sa.nii.gz; never seg_sa
    groups = image_files(tmp_path / "train")
    assert [[p.name for p in g] for g in groups] == [["sa.nii.gz"], ["sa.nii.gz"]]
    assert [case_id_of(g) for g in groups] == ["s1", "s2"]
    assert [case_id_of(g) for g in image_files(tmp_path / "test" / "s3")] == ["s3"]
    assert case_id_of(image_files(tmp_path / "test" / "s3" / "sa.nii.gz")[0]) == "s3"


def test_sunnybrook_cine_checks():
    root = SHARED_DATA / "cardiac-sunnybrook-cine"
    if not root.exists():
        pytest.skip(f"benchmark data not found at {root}")
    ds = open_dataset(root / "train")
    assert ds.layout == "ukbb" and ds.ignore_label == 255 and ds.num_classes == 3 and len(ds.train) == 3
    _, lab = ds.train[0].load()
    stats = annotation_stats(lab.data, 255)
    assert stats["annotated_frames"] == 1 and stats["annotated_slices"] == 9
