"""End-to-end command-line paths: phantom -> evaluate, train -> segment -> evaluate, info."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import write_blobs


def test_phantom_then_evaluate_against_itself(cli, tmp_path):
    """The foundation issue's check: identical label maps give Dice 1.0 and HD95 0."""
    x = tmp_path / "X"
    assert cli("data", "phantom", "--kind", "brain2d", "--n", "6", "--out", x).code == 0
    assert len(list((x / "labelsTr").iterdir())) == 6 and (x / "dataset.json").exists()
    res = cli("evaluate", "--pred", x / "labelsTr", "--gt", x / "labelsTr", "--out", tmp_path / "E")
    assert res.code == 0, res.err
    summary = json.loads((tmp_path / "E" / "summary.json").read_text())
    assert summary["mean_foreground_dice"] == 1.0 and summary["hd95_mm"] == 0.0
    assert summary["generalized_dice"] == pytest.approx(1.0) and summary["asd_mm"] == 0.0
    assert set(summary["per_class"]) == {"background", "cortex", "subcortical-grey-matter", "white-matter", "csf"}
    rows = list(csv.DictReader(open(tmp_path / "E" / "per_case.csv")))
    assert len(rows) == 6 and float(rows[0]["dice_cortex"]) == 1.0
    assert "mean foreground" in res.out  # the printed table


def test_evaluate_shifted_labels_matches_hand_calculation(cli, tmp_path):
    """A 10 x 10 square shifted by 3 columns; a 1-pixel line shifted 3 rows at 2 mm rows."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    gt = np.zeros((40, 40, 1), np.uint8)
    pred = np.zeros_like(gt)
    gt[10:20, 10:20] = 1
    pred[10:20, 13:23] = 1
    gt[30, 5:35] = 2
    pred[33, 5:35] = 2
    aff = np.diag([2.0, 1.0, 1.0, 1.0])  # axis 0 (rows) 2 mm, axis 1 (columns) 1 mm
    nib.save(nib.Nifti1Image(gt, aff), gt_dir / "c.nii.gz")
    nib.save(nib.Nifti1Image(pred, aff), pred_dir / "c.nii.gz")
    assert cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--out", tmp_path / "E").code == 0
    pc = json.loads((tmp_path / "E" / "summary.json").read_text())["per_class"]
    assert pc["class-1"]["dice"] == pytest.approx(0.7)            # 2 * 70 / 200
    assert pc["class-1"]["jaccard"] == pytest.approx(70 / 130)
    assert pc["class-2"]["dice"] == 0.0
    assert pc["class-2"]["hd95_mm"] == pytest.approx(6.0)         # 3 rows x 2 mm
    assert pc["class-2"]["asd_mm"] == pytest.approx(6.0)


def test_train_segment_evaluate_info(cli, tmp_path):
    data = write_blobs(tmp_path / "ds", n=6)
    ckpt = tmp_path / "m.safetensors"
    res = cli("--quiet", "train", "unet", "--data", data, "--out", ckpt, "--steps", "10", "--batch-size", "2")
    assert res.code == 0, res.err
    meta = json.loads(cli("info", ckpt).out)
    assert meta["method"] == "unet" and meta["label_names"] == ["background", "core", "rim"]
    out = tmp_path / "pred"
    res = cli("--quiet", "segment", "--model", ckpt, "--input", data / "imagesTr", "--output", out, "--overlays")
    assert res.code == 0, res.err
    assert len(list(out.glob("*.nii.gz"))) == 6 and len(list(out.glob("*.png"))) == 6
    src = nib.load(data / "imagesTr" / "sub00_x_0000.nii.gz")
    lab = nib.load(out / "sub00_x.nii.gz")
    assert lab.shape == src.shape and np.allclose(lab.affine, src.affine)
    res = cli("--quiet", "segment", "--model", ckpt, "--input", data / "imagesTr" / "sub00_x_0000.nii.gz",
              "--output", tmp_path / "p2", "--scale", "2")
    up = nib.load(tmp_path / "p2" / "sub00_x.nii.gz")
    assert up.shape == (64, 64, 1) and up.affine[0, 0] == pytest.approx(0.5)
    res = cli("--quiet", "evaluate", "--pred", out, "--gt", data / "labelsTr", "--out", tmp_path / "rep")
    assert res.code == 0 and json.loads((tmp_path / "rep" / "summary.json").read_text())["n_cases"] == 6


def test_phantom_layouts(cli, tmp_path):
    res = cli("data", "phantom", "--kind", "cardiac", "--n", "2", "--layout", "ukbb", "--shape", "32,32,4",
              "--frames", "4", "--out", tmp_path / "C")
    assert res.code == 0, res.err
    from inrseg.data.layouts import open_dataset

    ds = open_dataset(tmp_path / "C")
    assert ds.layout == "ukbb" and ds.spatial_ndim == 4
    img, lab = ds.train[0].load()
    assert img.shape == (32, 32, 4, 4) and img.spacing == pytest.approx((5.4, 5.4, 20.0))
    res = cli("data", "phantom", "--kind", "cardiac", "--n", "1", "--shape", "32,32,4", "--frames", "3",
              "--out", tmp_path / "N")
    ds = open_dataset(tmp_path / "N")
    assert [c.case_id for c in ds.train] == ["heart000_t00", "heart000_t01", "heart000_t02"]
    assert {c.subject_id for c in ds.train} == {"heart000"}
    # refusing to overwrite, and --force
    assert cli("data", "phantom", "--kind", "brain2d", "--n", "1", "--out", tmp_path / "N").code == 2
    assert cli("data", "phantom", "--kind", "brain2d", "--n", "1", "--shape", "40,48", "--force",
               "--out", tmp_path / "N").code == 0
    assert open_dataset(tmp_path / "N").train[0].load_image().shape == (40, 48)


def test_quiet_silences_progress(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("INRSEG_PROGRESS", "1")  # force bars even though stderr is not a terminal
    loud = cli("data", "phantom", "--kind", "brain2d", "--n", "2", "--shape", "32,32", "--out", tmp_path / "a")
    assert loud.code == 0 and "writing brain2d phantoms" in loud.err
    quiet = cli("--quiet", "data", "phantom", "--kind", "brain2d", "--n", "2", "--shape", "32,32",
                "--out", tmp_path / "b")
    assert quiet.code == 0 and quiet.err == ""


def test_evaluate_cine_4d_per_frame(cli, tmp_path):
    assert cli("data", "phantom", "--kind", "cardiac", "--n", "2", "--layout", "ukbb", "--shape", "32,32,4",
               "--frames", "3", "--out", tmp_path / "C").code == 0
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    for d in sorted((tmp_path / "C").iterdir()):
        seg = nib.load(d / "seg_sa.nii.gz")
        nib.save(seg, gt / f"{d.name}.nii.gz")
        arr = np.asarray(seg.dataobj).copy()
        arr[..., 1][arr[..., 1] == 3] = 0  # frame 1: the RV is missed
        nib.save(nib.Nifti1Image(arr, seg.affine, seg.header), pred / f"{d.name}.nii.gz")
    res = cli("evaluate", "--pred", pred, "--gt", gt, "--out", tmp_path / "E")
    assert res.code == 0, res.err
    pc = json.loads((tmp_path / "E" / "summary.json").read_text())["per_class"]
    assert pc["class-1"]["dice"] == 1.0 and pc["class-2"]["dice"] == 1.0
    # RV Dice is 1, 0, 1 over the three frames where present -> 2/3 per subject
    assert pc["class-3"]["dice"] == pytest.approx(2 / 3)


def test_nisf_cli_train_heldout_and_plane(cli, tmp_path):
    data = tmp_path / "C"
    assert cli("--quiet", "data", "phantom", "--kind", "cardiac", "--n", "3", "--layout", "ukbb", "--shape",
               "24,24,4", "--frames", "2", "--out", data).code == 0
    ckpt = tmp_path / "nisf.safetensors"
    res = cli("--quiet", "train", "nisf", "--data", data, "--out", ckpt, "--preset", "nisf-cpu-small",
              "--steps", "20", "--infer-max-steps", "20", "--val-fraction", "0.34", "--augment", "1",
              "--augment-translate", "0.1", "--augment-elastic", "1.5")
    assert res.code == 0, res.err
    meta = json.loads(cli("info", ckpt).out)
    assert meta["method"] == "nisf" and 0 <= meta["infer_steps"] <= 20
    assert meta["config"]["augment"] == 1 and meta["config"]["augment_translate"] == 0.1
    assert meta["config"]["augment_elastic"] == 1.5
    from safetensors.torch import load_file

    assert load_file(str(ckpt))["train_latents"].shape[0] == 2   # 1 training cine (2 validate) + its copy
    sa = data / "heart000" / "sa.nii.gz"
    out = tmp_path / "pred"
    res = cli("--quiet", "segment", "--model", ckpt, "--input", sa, "--output", out, "--heldout", "2:1",
              "--plane", "lax", "--plane-size", "24,16", "--plane-mm", "2")
    assert res.code == 0, res.err
    src = nib.load(sa)
    lab = nib.load(out / "heart000.nii.gz")  # a UK Biobank sa.nii.gz is named after its subject
    assert lab.shape == src.shape and np.allclose(lab.affine, src.affine)
    plane = nib.load(out / "heart000_plane.nii.gz")
    assert plane.shape == (24, 16, 1) and (out / "heart000_plane.png").exists()
    assert np.linalg.norm(plane.affine[:3, 0]) == pytest.approx(2.0)
    # a U-Net checkpoint cannot render planes: a clear error
    unet = tmp_path / "u.safetensors"
    from inrseg.methods.unet import UNetConfig, UNetSegmenter

    UNetSegmenter(["bg", "a"], 4 - 1, 1, UNetConfig(channels=(4, 8), num_res_units=0)).save(unet)
    res = cli("segment", "--model", unet, "--input", sa, "--output", tmp_path / "x", "--plane", "lax")
    assert res.code == 2 and "--plane needs an implicit model" in res.err


def test_morse_cli_train_and_segment(cli, tmp_path):
    data = write_blobs(tmp_path / "ds", n=4)
    ckpt = tmp_path / "morse.safetensors"
    res = cli("--quiet", "train", "morse", "--data", data, "--out", ckpt, "--backbone", "unet",
              "--variant", "morse", "--steps", "4", "--batch-size", "2")
    assert res.code == 0, res.err
    meta = json.loads(cli("info", ckpt).out)
    assert meta["method"] == "morse" and meta["config"]["variant"] == "morse"
    res = cli("--quiet", "segment", "--model", ckpt, "--input", data / "imagesTr", "--output", tmp_path / "p")
    assert res.code == 0, res.err
    assert len(list((tmp_path / "p").glob("*.nii.gz"))) == 4


def test_metaseg_cli_train_segment_2x_and_figures(cli, tmp_path):
    data = write_blobs(tmp_path / "ds", n=5, shape=(24, 24))
    ckpt = tmp_path / "ms.safetensors"
    res = cli("--quiet", "train", "metaseg", "--data", data, "--out", ckpt, "--steps", "6", "--val-fraction", "0.2",
              "--head-context", "2")
    assert res.code == 0, res.err
    meta = json.loads(cli("info", ckpt).out)
    assert meta["method"] == "metaseg" and meta["t_f"] in meta["config"]["tf_candidates"]
    assert meta["config"]["head_context"] == 2.0
    res = cli("--quiet", "segment", "--model", ckpt, "--input", data / "imagesTr" / "sub00_x_0000.nii.gz",
              "--output", tmp_path / "p", "--scale", "2")
    assert res.code == 0, res.err
    up = nib.load(tmp_path / "p" / "sub00_x.nii.gz")
    assert up.shape == (48, 48, 1) and up.affine[0, 0] == pytest.approx(0.5)
    res = cli("--quiet", "figures", "--model", ckpt, "--data", data, "--out", tmp_path / "fig", "--cases", "1",
              "--max-steps", "10")
    assert res.code == 0, res.err
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["dice_psnr_vs_steps.json", "dice_psnr_vs_steps.png", "sub00_x_features_pca.png",
                     "sub00_x_overlay.png"]


def test_train_3d_with_patch_and_foreground_options(cli, tmp_path):
    """--patch / --foreground-fraction reach the 3D configs (U-Net and MORSE); a bad --patch is a
    one-line usage error."""
    data = write_blobs(tmp_path / "D3", n=5, shape=(40, 40, 36))
    ckpt = tmp_path / "u3.safetensors"
    res = cli("--quiet", "train", "unet", "--data", data, "--out", ckpt, "--steps", "2",
              "--patch", "32", "--foreground-fraction", "1")
    assert res.code == 0, res.err
    cfg = json.loads(cli("info", ckpt).out)["config"]
    assert cfg["patch_size"] == [32, 32, 32] and cfg["foreground_fraction"] == 1.0
    ckpt = tmp_path / "m3.safetensors"
    res = cli("--quiet", "train", "morse", "--data", data, "--out", ckpt, "--backbone", "unet3d",
              "--variant", "baseline", "--steps", "2", "--patch", "32,32,8", "--foreground-fraction", "0")
    assert res.code == 0, res.err
    cfg = json.loads(cli("info", ckpt).out)["config"]
    assert cfg["patch_size"] == [32, 32, 8] and cfg["foreground_fraction"] == 0.0
    res = cli("train", "unet", "--data", data, "--out", tmp_path / "x.safetensors", "--patch", "16,16")
    assert res.code == 2 and "--patch" in res.err and not (tmp_path / "x.safetensors").exists()


def test_ukbb_folder_segments_and_evaluates(cli, tmp_path):
    """A UK Biobank folder of 2 subjects: `segment --input DIR` writes DIR's subjects as
    <subject>.nii.gz (never reading seg_sa.nii.gz as an input); `evaluate --gt DIR` pairs them
    with <subject>/seg_sa.nii.gz, skipping the ignore value of the dataset.json next to it."""
    data = tmp_path / "C"
    assert cli("--quiet", "data", "phantom", "--kind", "cardiac", "--n", "2", "--n-test", "2", "--layout", "ukbb",
               "--shape", "16,16,4", "--frames", "2", "--out", data).code == 0
    ckpt = tmp_path / "nisf.safetensors"
    res = cli("--quiet", "train", "nisf", "--data", data / "train", "--out", ckpt,
              "--steps", "2", "--infer-max-steps", "2", "--val-fraction", "0.5")
    assert res.code == 0, res.err
    cfg = json.loads(cli("info", ckpt).out)["config"]
    assert (cfg["width"], cfg["depth"]) == (64, 4)      # the CPU default preset: nisf-cpu-small
    test = data / "test"
    subjects = sorted(d.name for d in test.iterdir())
    assert len(subjects) == 2
    # sparse labels: frame 1 of every subject unannotated (255), declared in dataset.json
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lv": 1, "myo": 2, "rv": 3},
                                                   "ignore": 255}))
    for s in subjects:
        seg = nib.load(test / s / "seg_sa.nii.gz")
        arr = np.asarray(seg.dataobj).copy()
        arr[..., 1] = 255
        nib.save(nib.Nifti1Image(arr, seg.affine, seg.header), test / s / "seg_sa.nii.gz")
    out = tmp_path / "pred"
    res = cli("--quiet", "segment", "--model", ckpt, "--input", test, "--output", out)
    assert res.code == 0, res.err
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.nii.gz" for s in subjects]
    for s in subjects:
        assert nib.load(out / f"{s}.nii.gz").shape == nib.load(test / s / "sa.nii.gz").shape
    res = cli("--quiet", "evaluate", "--pred", out, "--gt", test, "--out", tmp_path / "E", "--no-distances")
    assert res.code == 0, res.err
    summary = json.loads((tmp_path / "E" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and list(summary["per_class"]) == ["background", "lv", "myo", "rv"]
    rows = list(csv.DictReader(open(tmp_path / "E" / "per_case.csv")))
    assert [r["case"] for r in rows] == subjects
    # the same numbers as scoring frame 0 alone (frame 1 is unannotated and skipped)
    from inrseg.metrics import case_metrics

    for r, s in zip(rows, subjects):
        gt = np.asarray(nib.load(test / s / "seg_sa.nii.gz").dataobj)
        pred = np.asarray(nib.load(out / f"{s}.nii.gz").dataobj)
        ref = case_metrics(pred[..., 0], gt[..., 0], 4, distances=False)
        assert float(r["mean_foreground_dice"]) == pytest.approx(ref.mean_foreground_dice, nan_ok=True)
    # data check reads the ignore value and reports the annotated share
    res = cli("data", "check", data)
    assert res.code == 0, res.err
    ann = json.loads(res.out)["annotation"]
    assert ann["ignore_label"] == 255 and ann["annotated_frames"] == 6 and ann["frames"] == 8
    assert ann["annotated_voxel_fraction"] == pytest.approx(0.75)  # train fully, test half annotated


@pytest.mark.parametrize("method", ["unet", "metaseg", "nisf", "morse"])
def test_segment_save_probabilities(method, cli, tmp_path):
    """--save-probabilities writes <case>.npz beside each label map: (C, *S) float32 summing to
    1, whose argmax is the label map, for every method family."""
    import nibabel as nib
    import numpy as np

    from conftest import write_nnunet
    from inrseg.methods.registry import segmenter_class

    root = write_nnunet(tmp_path / "ds", n=2, shape=(16, 20))
    names = ["background", "a", "b"]
    cls = segmenter_class(method)
    if method == "unet":
        from inrseg.methods.unet import UNetConfig
        model = cls(names, 2, 1, UNetConfig(channels=(4, 8), num_res_units=0))
    elif method == "metaseg":
        from inrseg.methods.metaseg import MetaSegConfig
        model = cls(names, 2, 1, MetaSegConfig(hidden=16, layers=3, tf_candidates=(3,)))
        model.t_f = 3
    elif method == "nisf":
        from inrseg.methods.nisf import config_from_preset
        model = cls(names, 2, 1, config_from_preset("nisf-cpu-small", infer_steps=2))
    else:
        from inrseg.methods.morse import morse_config
        model = cls(names, 2, 1, morse_config("unet", "morse", 2, "cpu"))
    model.save(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    res = cli("segment", "--model", tmp_path / "m.safetensors", "--input", root / "imagesTr", "--output", out,
              "--save-probabilities")
    assert res.code == 0, res.err
    for lab_file in sorted(out.glob("*.nii.gz")):
        npz = np.load(lab_file.with_name(lab_file.name.replace(".nii.gz", ".npz")))
        probs, labels = npz["probabilities"], np.asarray(nib.load(lab_file).dataobj)[..., 0]
        assert probs.dtype == np.float32 and probs.shape == (3, 16, 20)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(0), labels)
        assert list(npz["label_names"]) == names
    # the same labels as a plain run: the probabilities come from the prediction itself
    assert cli("segment", "--model", tmp_path / "m.safetensors", "--input", root / "imagesTr", "--output",
               tmp_path / "plain").code == 0
    for lab_file in sorted(out.glob("*.nii.gz")):
        np.testing.assert_array_equal(np.asarray(nib.load(lab_file).dataobj),
                                      np.asarray(nib.load(tmp_path / "plain" / lab_file.name).dataobj))
