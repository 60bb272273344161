"""Post-processing chosen on validation (issue 24, item 4): keep the largest connected component
of a class only where that raises the class' validation Dice; stored with the model, applied
by ``segment`` unless ``--no-postprocess``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import inrseg.core.progress as progress
from inrseg.core.errors import InputError
from inrseg.data.cases import Case
from inrseg.data.nifti import load_labels, save_image, save_labels
from inrseg.data.postprocess import apply_postprocessing, check_postprocessing, keep_largest_component
from inrseg.data.volume import Volume
from inrseg.methods.postprocess import choose_postprocessing
from inrseg.methods.registry import entry, load_segmenter
from inrseg.methods.unet import UNetConfig
from inrseg.metrics import score_case, summarize
from conftest import write_blobs

NAMES = ["background", "twins", "organ", "single"]
EQUIVALENCE = Path(__file__).resolve().parent / "fixtures" / "equivalence"


# ----------------------------------------------------------------------------- keep-largest
def test_keep_largest_keeps_exactly_the_largest_component_of_each_chosen_class():
    lab = np.zeros((12, 12), np.int64)
    lab[1:4, 1:4] = 1          # class 1: 9 voxels ...
    lab[4, 4] = 1              # ... touching diagonally: the same component (full connectivity), 10
    lab[8:10, 8:10] = 1        # class 1: 4 voxels, another component
    lab[0, 10:12] = 2          # class 2: two components, not chosen
    lab[11, 0] = 2
    out = keep_largest_component(lab, [1])
    expected = lab.copy()
    expected[8:10, 8:10] = 0   # the smaller component becomes background, nothing else changes
    np.testing.assert_array_equal(out, expected)
    assert lab[8, 8] == 1      # the input is not modified
    np.testing.assert_array_equal(apply_postprocessing(lab, {"keep_largest": [1, 2]})[0, 10:12], [2, 2])
    assert apply_postprocessing(lab, {"keep_largest": [1, 2]})[11, 0] == 0
    assert apply_postprocessing(lab, None) is lab and apply_postprocessing(lab, {"keep_largest": []}) is lab
    # 3D: a corner-touching voxel is connected (26-neighbourhood)
    vol = np.zeros((6, 6, 6), np.int64)
    vol[0:2, 0:2, 0:2] = 3
    vol[2, 2, 2] = 3
    vol[5, 5, 0] = 3
    out3 = keep_largest_component(vol, [3])
    assert out3[2, 2, 2] == 3 and out3[5, 5, 0] == 0 and (out3 == 3).sum() == 9


def test_keep_largest_of_a_cine_is_per_frame():
    """3D + t: components connect in space, not across time; each frame keeps its own largest."""
    cine = np.zeros((6, 6, 2, 3), np.int64)
    cine[0:3, 0:3, 0, 0] = 1                 # frame 0: the large one here ...
    cine[5, 5, 0, 0] = 1                     # ... and a stray voxel
    cine[4:6, 4:6, :, 1] = 1                 # frame 1: elsewhere, one component
    out = keep_largest_component(cine, [1])
    assert out[5, 5, 0, 0] == 0 and (out[..., 0] == 1).sum() == 9
    np.testing.assert_array_equal(out[..., 1], cine[..., 1])


def test_a_spec_from_a_header_is_checked():
    assert check_postprocessing(None, 4) is None
    assert check_postprocessing({"keep_largest": [1, 3]}, 4) == {"keep_largest": [1, 3]}
    for bad in ({"keep_largest": [4]}, {"keep_largest": [0]}, {"keep_largest": [1, 1]}, {"keep_largest": "1"},
                {"keep_largest": [True]}, {"fill_holes": [1]}, [1, 2]):
        with pytest.raises(InputError, match="post-processing"):
            check_postprocessing(bad, 4, "m.safetensors")


# ----------------------------------------------------------------------------- the choice on validation
class _Fixed:
    """A model that predicts a fixed label map per image (keyed by the image's file)."""

    method = "fixed"
    label_names = NAMES
    num_classes = len(NAMES)

    def __init__(self, preds: dict[str, np.ndarray]) -> None:
        self.preds = preds

    def predict(self, image: Volume) -> Volume:
        return Volume(self.preds[image.path.name], image.affine, 2)


def _val_case(root: Path, cid: str, gt: np.ndarray) -> Case:
    like = Volume(gt, np.eye(4), 2)
    save_image(gt.astype(np.float32), root / f"{cid}_0000.nii.gz", like=like)
    save_labels(gt, root / f"{cid}_gt.nii.gz", like=like)
    return Case(cid, cid, (root / f"{cid}_0000.nii.gz",), root / f"{cid}_gt.nii.gz", 2)


def _dice(preds, cases, spec=None):
    per_case = [score_case(apply_postprocessing(preds[c.image_paths[0].name], spec), c.load_labels().data,
                           len(NAMES), distances=False) for c in cases]
    return {n: v["dice"] for n, v in summarize(per_case, NAMES)["per_class"].items()}


def test_post_processing_is_on_only_where_it_raises_validation_dice(tmp_path, capsys, monkeypatch):
    """Class ``twins``: the true mask has two components, predicted right: keeping the largest would
    lower its Dice, so it is switched off. Class ``organ``: one true blob, predicted with a
    spurious blob far away: keeping the largest removes it, so it is switched on. Class
    ``single``: one component, predicted right: no change, so it stays off."""
    gt = np.zeros((24, 24), np.uint8)
    gt[1:5, 1:5] = 1
    gt[1:4, 18:21] = 1               # twins: a second true component
    gt[10:16, 10:16] = 2             # organ
    gt[20:23, 1:4] = 3               # single
    pred = gt.astype(np.int64).copy()
    pred[19:22, 19:22] = 2           # a spurious organ blob
    pred[10, 10] = 0                 # and one missed organ voxel (the gain is not to a perfect score)
    cases = [_val_case(tmp_path, f"v{i}", gt) for i in range(2)]
    model = _Fixed({c.image_paths[0].name: pred for c in cases})
    monkeypatch.setattr(progress, "_quiet", False)   # an earlier test's `inrseg -q` must not hide the line
    spec = choose_postprocessing(model, cases)
    assert spec == {"keep_largest": [2]}
    raw, forced = _dice(model.preds, cases), _dice(model.preds, cases, {"keep_largest": [1, 2, 3]})
    assert forced["twins"] < raw["twins"]          # where it would lower Dice ...
    assert forced["organ"] > raw["organ"]          # ... where it helps ...
    assert forced["single"] == raw["single"]       # ... where it changes nothing
    chosen = _dice(model.preds, cases, spec)
    assert all(chosen[n] >= raw[n] for n in NAMES[1:]) and chosen["organ"] > raw["organ"]
    line = [ln for ln in capsys.readouterr().err.splitlines() if "post-processing" in ln]
    assert len(line) == 1 and "keep the largest component of organ" in line[0] and "+0." in line[0]
    assert "not of twins -0." in line[0]


def test_no_validation_cases_no_post_processing():
    assert choose_postprocessing(_Fixed({}), []) == {"keep_largest": []}


# ----------------------------------------------------------------------------- stored with the model
def _unet(postprocessing=None):
    model = entry("unet").cls(NAMES, 2, 1, UNetConfig(channels=(4, 8), num_res_units=0))
    model.postprocessing = postprocessing
    return model


def test_the_choice_is_saved_and_reloaded(tmp_path):
    path = tmp_path / "m.safetensors"
    _unet({"keep_largest": [2, 3]}).save(path)
    assert load_segmenter(path).postprocessing == {"keep_largest": [2, 3]}
    _unet().save(path)
    assert load_segmenter(path).postprocessing is None
    # a checkpoint written before post-processing existed loads with none
    assert load_segmenter(EQUIVALENCE / "unet-2d.safetensors").postprocessing is None
    # a header naming classes the model has not is refused in one line
    _unet({"keep_largest": [7]}).save(path)
    with pytest.raises(InputError, match="keep_largest"):
        load_segmenter(path)


def test_segment_applies_it_and_no_postprocess_gives_the_raw_labels(tmp_path, monkeypatch, cli):
    raw = np.zeros((16, 16), np.int64)
    raw[2:8, 2:8] = 2
    raw[12:14, 12:14] = 2            # a stray organ blob: removed by the post-processing
    raw[0:2, 14:16] = 1              # twins: two components, not post-processed
    raw[14:16, 0:2] = 1
    logits = torch.nn.functional.one_hot(torch.from_numpy(raw), len(NAMES)).permute(2, 0, 1).float() * 5
    monkeypatch.setattr(entry("unet").cls, "logits", lambda self, image, scale=1.0: (logits.clone(), image.affine))
    ckpt = tmp_path / "m.safetensors"
    _unet({"keep_largest": [2]}).save(ckpt)
    src = tmp_path / "in"
    save_image(raw.astype(np.float32), src / "c_0000.nii.gz", like=Volume(raw, np.eye(4), 2))
    processed = keep_largest_component(raw, [2])
    assert (processed != raw).any()
    res = cli("segment", "--model", ckpt, "--input", src, "--output", tmp_path / "pp")
    assert res.code == 0, res.err
    assert "post-processing chosen on validation: keep the largest component of organ" in res.err
    np.testing.assert_array_equal(load_labels(tmp_path / "pp" / "c.nii.gz").data, processed)
    assert cli("-q", "segment", "--model", ckpt, "--input", src, "--output", tmp_path / "raw",
               "--no-postprocess").code == 0
    np.testing.assert_array_equal(load_labels(tmp_path / "raw" / "c.nii.gz").data, raw)
    # the labels made from the probabilities are post-processed too; the probabilities are not
    assert cli("-q", "segment", "--model", ckpt, "--input", src, "--output", tmp_path / "prob",
               "--save-probabilities").code == 0
    np.testing.assert_array_equal(load_labels(tmp_path / "prob" / "c.nii.gz").data, processed)
    with np.load(tmp_path / "prob" / "c.npz") as z:
        np.testing.assert_array_equal(z["probabilities"].argmax(0), raw)


def test_train_chooses_it_on_validation_and_saves_it(tmp_path, cli):
    data = write_blobs(tmp_path / "ds", n=4)
    ckpt = tmp_path / "m.safetensors"
    res = cli("train", "unet", "--data", data, "--out", ckpt, "--steps", "2", "--batch-size", "2",
              "--channels", "[4, 8]", "--num-res-units", "0")
    assert res.code == 0, res.err
    assert "unet: post-processing chosen on 1 validation cases:" in res.err
    spec = load_segmenter(ckpt).postprocessing
    assert isinstance(spec, dict) and set(spec) == {"keep_largest"}
