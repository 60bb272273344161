"""Ensembles (issue 24, item 2): ``inrseg ensemble`` averages probability folders nnU-Net-style,
and ``bench`` scores the ensemble of its seeds as one more row."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import inrseg.cli.bench_cmds as bench_cmds
import inrseg.eval.bench as bench
from inrseg.data.layouts import open_dataset
from inrseg.data.nifti import load_labels
from inrseg.data.postprocess import apply_postprocessing
from inrseg.eval.ensemble import ProbabilityMean, SeedEnsemble, ensemble_probabilities, write_probabilities
from inrseg.methods.registry import entry
from inrseg.metrics import score_case
from conftest import write_blobs

NAMES = ["background", "a", "b"]
AFFINE = np.array([[1.5, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 3.0, 1], [0, 0, 0, 1]])


def _probs(rng, shape, k=len(NAMES)) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=shape).astype(np.float32).transpose(-1, *range(len(shape)))


def _folder(root: Path, arrays: dict[str, np.ndarray], names=NAMES, affine=AFFINE) -> Path:
    for cid, p in arrays.items():
        write_probabilities(root / f"{cid}.npz", p, names, affine)
    return root


# ----------------------------------------------------------------------------- the mean
def test_probability_mean_is_the_hand_average_and_of_one_array_that_array():
    rng = np.random.default_rng(0)
    a, b, c = (_probs(rng, (5, 4, 3)) for _ in range(3))
    np.testing.assert_array_equal(ensemble_probabilities([a]), a)
    np.testing.assert_allclose(ensemble_probabilities([a, b, c]), (a.astype(np.float64) + b + c) / 3, atol=1e-6)
    acc = ProbabilityMean()
    acc.add(a)
    with pytest.raises(ValueError, match="cannot be averaged"):
        acc.add(a[:, :2])
    with pytest.raises(ValueError):
        ProbabilityMean().mean()


def test_labels_are_the_argmax_of_the_probabilities_for_every_method(tmp_path):
    """What bench relies on to predict once: ``predict``'s labels are the argmax of
    ``predict_probabilities`` (CNN logits; MetaSeg's and NISF's own test-time fits)."""
    torch.manual_seed(0)
    ds = open_dataset(write_blobs(tmp_path / "ds", n=2))
    image, _ = ds.train[0].load()
    small = {"unet": dict(channels=(4, 8), num_res_units=0), "morse": {},
             "metaseg": dict(hidden=16, layers=2, default_tf=3),
             "nisf": dict(width=16, depth=2, infer_steps=3, infer_points=256, fourier_frequencies=8)}
    for method, fields in small.items():
        cls = entry(method).cls
        model = cls(ds.label_names, 2, 1, dataclasses.replace(cls.config_class(), **fields))
        labels = model.predict(image).data
        probs = model.predict_probabilities(image).data
        assert probs.shape == (3, *labels.shape)
        np.testing.assert_array_equal(labels, probs.argmax(0), err_msg=method)


# ----------------------------------------------------------------------------- inrseg ensemble
def test_the_ensemble_of_one_model_equals_that_model(tmp_path, cli):
    torch.manual_seed(0)
    data = write_blobs(tmp_path / "ds", n=3)
    model = entry("unet").cls(NAMES[:1] + ["core", "rim"], 2, 1, entry("unet").cls.config_class(channels=(4, 8),
                                                                                                  num_res_units=0))
    ckpt = tmp_path / "m.safetensors"
    model.save(ckpt)
    seg = tmp_path / "seg"
    assert cli("-q", "segment", "--model", ckpt, "--input", data / "imagesTr", "--output", seg,
               "--save-probabilities").code == 0
    res = cli("-q", "ensemble", "--input", seg, "--output", tmp_path / "ens", "--save-probabilities")
    assert res.code == 0, res.err
    for src in sorted((data / "imagesTr").glob("*.nii.gz")):
        cid = src.name[: -len("_0000.nii.gz")]
        ens = load_labels(tmp_path / "ens" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(ens.data, load_labels(seg / f"{cid}.nii.gz").data)
        np.testing.assert_allclose(ens.affine, nib.load(src).affine)
        with np.load(seg / f"{cid}.npz") as one, np.load(tmp_path / "ens" / f"{cid}.npz") as mean:
            np.testing.assert_array_equal(mean["probabilities"], one["probabilities"])
            assert list(mean["label_names"]) == ["background", "core", "rim"]


def test_the_mean_of_two_folders_is_the_hand_average(tmp_path, cli):
    rng = np.random.default_rng(1)
    cases = {"c1": (6, 5, 4), "c2": (7, 3, 2), "flat": (8, 9)}          # 3D and 2D cases
    a = {cid: _probs(rng, s) for cid, s in cases.items()}
    b = {cid: _probs(rng, s) for cid, s in cases.items()}
    res = cli("-q", "ensemble", "--input", _folder(tmp_path / "A", a), "--input", _folder(tmp_path / "B", b),
              "--output", tmp_path / "E", "--save-probabilities")
    assert res.code == 0, res.err
    assert sorted(p.name for p in (tmp_path / "E").iterdir()) == sorted(
        [f"{c}.nii.gz" for c in cases] + [f"{c}.npz" for c in cases])
    for cid, shape in cases.items():
        hand = (a[cid].astype(np.float64) + b[cid]) / 2
        with np.load(tmp_path / "E" / f"{cid}.npz") as z:
            np.testing.assert_allclose(z["probabilities"], hand, atol=1e-6)
            np.testing.assert_array_equal(z["affine"], AFFINE)
        labels = load_labels(tmp_path / "E" / f"{cid}.nii.gz")
        assert labels.shape == shape
        np.testing.assert_array_equal(labels.data, hand.argmax(0))
        np.testing.assert_allclose(labels.affine, AFFINE)
    # without --save-probabilities: the label maps only
    assert cli("-q", "ensemble", "--input", tmp_path / "A", "--input", tmp_path / "B", "--output",
               tmp_path / "L").code == 0
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == sorted(f"{c}.nii.gz" for c in cases)


def _mismatch(tmp_path: Path, kind: str) -> tuple[list[Path], str]:
    """Two folders that must not be averaged, and what the one error line must name."""
    rng = np.random.default_rng(2)
    a = {"c1": _probs(rng, (4, 4, 2)), "c2": _probs(rng, (4, 4, 2))}
    A, B = _folder(tmp_path / "A", a), tmp_path / "B"
    if kind == "missing case":
        _folder(B, {"c1": a["c1"]})
        return [A, B], f"{B}: has no probabilities of case 'c2'"
    if kind == "extra case":
        _folder(B, {**a, "c3": a["c1"]})
        return [A, B], f"{B}: has probabilities of case 'c3', which {A} lacks"
    if kind == "label names":
        _folder(B, a, names=["background", "a", "c"])
        return [A, B], f"{B / 'c1.npz'}: label names"
    if kind == "shape":
        _folder(B, {"c1": a["c1"], "c2": _probs(rng, (4, 4, 3))})
        return [A, B], f"{B / 'c2.npz'}: probabilities of shape (3, 4, 4, 3) do not match"
    if kind == "affine":
        _folder(B, a, affine=AFFINE + np.diag([0, 0.5, 0, 0]))
        return [A, B], f"{B / 'c1.npz'}: affine differs"
    if kind == "not a probability file":
        _folder(B, a)
        (B / "c2.npz").write_bytes(b"not a zip file")
        return [A, B], f"{B / 'c2.npz'}: is not a probability file"
    if kind == "non-finite":         # found while writing (after c1 was written): still nothing appears
        bad = a["c2"].copy()
        bad[0, 0, 0, 0] = np.nan
        _folder(B, {"c1": a["c1"], "c2": bad})
        return [A, B], f"{B / 'c2.npz'}: is not a probability file"
    if kind == "no probabilities":
        B.mkdir()
        (B / "c1.nii.gz").write_bytes(b"")
        return [A, B], f"{B}: holds no probability files"
    if kind == "given twice":
        return [A, A], f"{A}: is given twice"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing case", "extra case", "label names", "shape", "affine",
                                  "not a probability file", "non-finite", "no probabilities", "given twice"])
def test_mismatched_folders_are_refused_in_one_line_and_nothing_is_written(tmp_path, cli, kind):
    inputs, expected = _mismatch(tmp_path, kind)
    out = tmp_path / "E"
    res = cli("ensemble", *[x for p in inputs for x in ("--input", p)], "--output", out)
    lines = res.err.strip().splitlines()
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), res.err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted({p.name for p in inputs})


# ----------------------------------------------------------------------------- bench's seed ensemble
def test_bench_scores_the_ensemble_of_its_seeds(tmp_path, cli, monkeypatch):
    assert cli("-q", "data", "phantom", "--kind", "brain2d", "--n", "5", "--n-test", "2", "--shape", "32,32",
               "--out", tmp_path / "ds").code == 0
    kept: dict[tuple[str, str], list[np.ndarray]] = {}
    keep = SeedEnsemble.keep

    def spy(self, which, case_id, probabilities):
        kept.setdefault((which, case_id), []).append(np.array(probabilities))
        keep(self, which, case_id, probabilities)

    monkeypatch.setattr(SeedEnsemble, "keep", spy)
    run = bench.run_bench(tmp_path / "ds", "unet", 0.01, [0, 1], tmp_path / "runs", device="cpu", allow_dirty=True,
                          threads=1)
    res = json.loads((run / "results.json").read_text())
    assert list(res["methods"]) == ["unet", "unet ensemble"]
    seeds = [r for r in res["runs"] if r["method"] == "unet"]
    (ens,) = [r for r in res["runs"] if r["method"] == "unet ensemble"]
    assert ens["seed"] == "0+1" and ens["train_s"] == pytest.approx(sum(r["train_s"] for r in seeds))
    assert ens["infer_s"] == pytest.approx([a + b for a, b in zip(seeds[0]["infer_s"], seeds[1]["infer_s"])])
    assert ens["params"] == 2 * seeds[0]["params"] and ens["chosen"]["members"] == "seeds 0, 1"
    assert set(ens["chosen"]) == {"members", "keep_largest"}
    assert all("keep_largest" in r["chosen"] for r in seeds)
    # every validation and test case was kept once per seed; the row scores their mean
    ds = open_dataset(tmp_path / "ds")
    assert {cid for which, cid in kept if which == "test"} == {c.case_id for c in ds.test}
    assert all(len(v) == 2 for v in kept.values())
    for row in ens["cases"]:
        labels = ds.test[[c.case_id for c in ds.test].index(row["case"])].load_labels()
        mean = ensemble_probabilities(kept[("test", row["case"])])
        pred = apply_postprocessing(mean.argmax(0), {"keep_largest": ens["chosen"]["keep_largest"]})
        m = score_case(pred, labels.data, ds.num_classes, labels.spacing, True, labels.meta.get("ignore_label"))
        assert row["mean_foreground_dice"] == pytest.approx(m.mean_foreground_dice, nan_ok=True)
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert sum(r["method"] == "unet ensemble" for r in rows) == len(ds.test)
    assert "| unet ensemble |" in (run / "results.md").read_text()


def test_bench_ensemble_option_reaches_run_bench(tmp_path, cli, monkeypatch):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / "results.md").write_text("x")
        return tmp_path / "r"

    monkeypatch.setattr(bench_cmds, "run_bench", fake)
    for flag, expected in ((None, None), ("--ensemble", True), ("--no-ensemble", False)):
        args = ["-q", "bench", "--data", tmp_path, "--methods", "unet", "--seeds", "2"] + ([flag] if flag else [])
        assert cli(*args).code == 0
        assert seen["ensemble"] is expected
