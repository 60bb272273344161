"""Subjects that are right by default: the rule never collapses a dataset into one subject, and
commands that split say which rule they used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inrseg.data.cases import Case
from inrseg.data.layouts import open_dataset
from inrseg.data.nifti import save_image, save_labels
from inrseg.data.splits import assign_subjects, split_by_subject, subject_rule
from inrseg.data.volume import Volume


def _cases(ids):
    return [Case(cid, cid, (), None, 3, (0, 1)) for cid in ids]


@pytest.mark.parametrize("ids, subjects, depth", [
    # MSD: every case shares the task prefix -> each case its own subject
    ([f"hippocampus_{i:03d}" for i in (1, 3, 4, 6)], 4, None),
    # ACDC: two frames (ED, ES) per patient -> the patient
    ([f"patient{p:03d}_frame{f:02d}" for p in (1, 2, 3) for f in (1, 12)], 3, 1),
    # brain2d slices: many slices per subject -> the subject
    ([f"sub{s:02d}_cor{d:+03d}" for s in range(5) for d in (-2, 0, 2)], 5, 1),
    # BraTS-style: two shared prefixes -> each case
    (["BraTS_2021_00001", "BraTS_2021_00002", "BraTS_2021_00003"], 3, None),
    # a shared first token but a second that groups: study_A_t1, study_A_t2, study_B_t1
    (["study_A_t1", "study_A_t2", "study_B_t1"], 2, 2),
])
def test_default_rule(ids, subjects, depth):
    got_depth, how = subject_rule(ids)
    assert got_depth == depth
    cases, line = assign_subjects(_cases(ids))
    assert len({c.subject_id for c in cases}) == subjects
    assert line.startswith(f"{subjects} subjects: ")


@pytest.mark.parametrize("n", [2, 5, 30])
def test_numbered_cases_are_never_one_subject(n):
    """Whatever the shared prefixes, cases told apart by a number make at least two subjects."""
    rng = np.random.default_rng(n)
    for _ in range(20):
        prefix = "_".join(rng.choice(["a", "b", "x1", "2"], size=rng.integers(1, 4)))
        ids = [f"{prefix}_{k:03d}" for k in rng.choice(1000, size=n, replace=False)]
        cases, _ = assign_subjects(_cases(ids))
        assert len({c.subject_id for c in cases}) == n


def test_frames_of_one_subject_stay_together():
    cases, line = assign_subjects(_cases(["heart000_t00", "heart000_t01", "heart000_t02"]))
    assert {c.subject_id for c in cases} == {"heart000"} and line.startswith("1 subjects: ")


def test_explicit_subjects_win():
    cases, line = assign_subjects(_cases(["hippocampus_001", "hippocampus_002", "hippocampus_003"]),
                                  {"hippocampus_001": "s1", "hippocampus_002": "s1"})
    assert [c.subject_id for c in cases] == ["s1", "s1", "hippocampus_003"]
    assert "2 cases from the splits file" in line


def _msd(root, n=6):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    for i in range(n):
        lab = (rng.random((8, 8, 8)) > 0.5).astype(np.uint8)
        like = Volume(lab, affine, 3)
        save_image(rng.random((8, 8, 8)).astype(np.float32), root / "imagesTr" / f"hippocampus_{i:03d}_0000.nii.gz",
                   like=like)
        save_labels(lab, root / "labelsTr" / f"hippocampus_{i:03d}.nii.gz", like=like)
    (root / "dataset.json").write_text(json.dumps({"name": "msd", "channel_names": {"0": "MRI"},
                                                   "labels": {"background": 0, "hippo": 1},
                                                   "file_ending": ".nii.gz", "numTraining": n}))
    return root


def test_msd_names_get_a_validation_split_by_default(tmp_path, cli):
    root = _msd(tmp_path / "msd")
    ds = open_dataset(root)
    assert len({c.subject_id for c in ds.train}) == 6
    train, val = split_by_subject(ds.train, 0.2, 0)
    assert len(val) == 2 and len(train) == 4
    info = json.loads(cli("data", "check", root).out)
    assert info["n_train_subjects"] == 6 and info["subject_rule"].startswith("6 subjects: each case")


def test_train_says_the_rule_before_it_splits(tmp_path, cli):
    root = _msd(tmp_path / "msd")
    res = cli("train", "unet", "--data", root, "--out", tmp_path / "m.safetensors", "--steps", "1",
              "--set", "channels=[4,8]", "--set", "num_res_units=0", "--patch", "8")
    assert res.code == 0, res.err
    assert "msd: 6 subjects: each case its own subject" in res.err
