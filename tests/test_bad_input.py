"""Bad input: one line naming the file and the problem, exit code 2, no traceback, nothing written.

One test per kind of bad input the foundation issue lists.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_nnunet
from inrseg.checkpoints import save_checkpoint
from inrseg.methods.supervised import SupervisedConfig, SupervisedSegmenter


def assert_one_line_error(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.err)
    lines = [ln for ln in res.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: ") and "Traceback" not in res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def model2d(tmp_path_factory) -> Path:
    """An (untrained) tiny 2D U-Net checkpoint: enough to exercise `inrseg segment`."""
    path = tmp_path_factory.mktemp("ckpt") / "unet.safetensors"
    SupervisedSegmenter(["background", "a", "b"], 2, 1,
                        SupervisedConfig(channels=(4, 8), num_res_units=0)).save(path)
    return path


def _good_image(path: Path, shape=(24, 20, 1)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4)), path)
    return path


def _no_outputs(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


def test_truncated_gzip(cli, tmp_path, model2d):
    f = _good_image(tmp_path / "in" / "case.nii.gz")
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    out = tmp_path / "out"
    res = cli("segment", "--model", model2d, "--input", f, "--output", out)
    assert_one_line_error(res, str(f), "gzip")
    assert _no_outputs(out)


def test_corrupt_gzip_stream(cli, tmp_path, model2d):
    f = _good_image(tmp_path / "in" / "case.nii.gz")
    raw = bytearray(f.read_bytes())
    raw[40:60] = b"\x00" * 20  # damage the deflate stream
    f.write_bytes(bytes(raw))
    res = cli("segment", "--model", model2d, "--input", f, "--output", tmp_path / "out")
    assert_one_line_error(res, str(f))
    assert _no_outputs(tmp_path / "out")


def test_not_nifti(cli, tmp_path, model2d):
    f = tmp_path / "in" / "notes.nii.gz"
    f.parent.mkdir()
    f.write_bytes(gzip.compress(b"this is a text file, not an image" * 20))
    res = cli("segment", "--model", model2d, "--input", f, "--output", tmp_path / "out")
    assert_one_line_error(res, str(f), "not a NIfTI")
    g = tmp_path / "in2" / "scan.nii"
    g.parent.mkdir()
    g.write_bytes(b"\x01\x02garbage" * 100)
    res = cli("segment", "--model", model2d, "--input", g, "--output", tmp_path / "out")
    assert_one_line_error(res, str(g))
    assert _no_outputs(tmp_path / "out")


def test_nan_and_inf_voxels(cli, tmp_path, model2d):
    good = _good_image(tmp_path / "in" / "a.nii.gz")
    arr = np.ones((24, 20, 1), np.float32)
    arr[3, 4, 0], arr[5, 5, 0] = np.nan, np.inf
    bad = tmp_path / "in" / "b.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), bad)
    out = tmp_path / "out"
    res = cli("segment", "--model", model2d, "--input", tmp_path / "in", "--output", out)
    assert_one_line_error(res, str(bad), "2 NaN/Inf voxels")
    assert _no_outputs(out), "a good case must not be written when another input is bad"
    assert good.exists()


def test_image_label_shape_mismatch(cli, tmp_path):
    root = write_nnunet(tmp_path / "ds", n=2)
    lab = root / "labelsTr" / "sub01_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 19, 1), np.uint8), np.diag([1.5, 1.5, 1.0, 1.0])), lab)
    assert_one_line_error(cli("data", "check", root), str(lab), "does not match image")


def test_image_label_affine_mismatch(cli, tmp_path):
    root = write_nnunet(tmp_path / "ds", n=2)
    lab = root / "labelsTr" / "sub00_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 1), np.uint8), np.diag([1.0, 1.5, 1.0, 1.0])), lab)
    assert_one_line_error(cli("data", "check", root), str(lab), "affine")


def test_prediction_grid_mismatch_in_evaluate(cli, tmp_path):
    root = write_nnunet(tmp_path / "ds", n=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in (root / "labelsTr").iterdir():
        (pred / p.name).write_bytes(p.read_bytes())
    bad = pred / "sub01_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 1), np.uint8), np.diag([1.5, 1.5, 1.0, 1.0])), bad)
    res = cli("evaluate", "--pred", pred, "--gt", root / "labelsTr", "--out", tmp_path / "rep")
    assert_one_line_error(res, str(bad), "shape")
    assert _no_outputs(tmp_path / "rep")


def test_label_values_not_in_dataset_json(cli, tmp_path):
    root = write_nnunet(tmp_path / "ds", n=2)
    lab = root / "labelsTr" / "sub00_s0.nii.gz"
    arr = np.zeros((24, 20, 1), np.uint8)
    arr[0, 0] = 7
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 1.0, 1.0])), lab)
    assert_one_line_error(cli("data", "check", root), str(lab), "[7]", "not in the dataset's labels")


def test_missing_channel_file(cli, tmp_path):
    root = write_nnunet(tmp_path / "ds", n=2, channels=2)
    (root / "imagesTr" / "sub01_s0_0001.nii.gz").unlink()
    assert_one_line_error(cli("data", "check", root), "sub01_s0_0001.nii.gz", "missing channel")


def test_empty_and_missing_directory(cli, tmp_path, model2d):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("data", "check", empty), str(empty), "not a dataset")
    assert_one_line_error(cli("data", "check", tmp_path / "nope"), str(tmp_path / "nope"), "does not exist")
    res = cli("segment", "--model", model2d, "--input", empty, "--output", tmp_path / "o")
    assert_one_line_error(res, str(empty), "empty")
    res = cli("evaluate", "--pred", empty, "--gt", tmp_path / "nope", "--out", tmp_path / "r")
    assert_one_line_error(res, str(tmp_path / "nope"), "does not exist")
    root = write_nnunet(tmp_path / "ds", n=1)
    for p in (root / "imagesTr").iterdir():
        p.unlink()
    assert_one_line_error(cli("data", "check", root), "imagesTr", "empty")


def test_4d_where_3d_expected(cli, tmp_path):
    path3d = tmp_path / "unet3d.safetensors"
    SupervisedSegmenter(["background", "a"], 3, 1, SupervisedConfig(channels=(4, 8), num_res_units=0)).save(path3d)
    f = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 5), np.float32), np.eye(4)), f)
    res = cli("segment", "--model", path3d, "--input", f, "--output", tmp_path / "out")
    assert_one_line_error(res, str(f), "4D", "expected 3D")
    # and in a dataset: an nnU-Net dataset of 4D images is refused unless it declares time
    root = write_nnunet(tmp_path / "ds", n=1, shape=(6, 6, 4))
    img = root / "imagesTr" / "sub00_s0_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4, 3), np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), img)
    assert_one_line_error(cli("data", "check", root), str(img), "4D")


def test_checkpoint_of_another_method(cli, tmp_path, model2d):
    f = _good_image(tmp_path / "in" / "a.nii.gz")
    res = cli("segment", "--model", model2d, "--method", "metaseg", "--input", f, "--output", tmp_path / "o")
    assert_one_line_error(res, str(model2d), "is a 'unet' checkpoint, not 'metaseg'")
    other = tmp_path / "nisf.safetensors"
    save_checkpoint(other, "nisf", {"w": __import__("torch").zeros(2)}, {"config": {}})
    from inrseg.errors import InputError
    with pytest.raises(InputError, match="is a 'nisf' checkpoint, not 'unet'"):
        SupervisedSegmenter.load(other)


def test_checkpoint_of_newer_format(cli, tmp_path):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt), metadata={"inrseg": json.dumps(
        {"format": "inrseg", "format_version": 99, "method": "unet"})})
    res = cli("segment", "--model", ckpt, "--input", tmp_path, "--output", tmp_path / "o")
    assert_one_line_error(res, str(ckpt), "format 99 is newer")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert_one_line_error(cli("info", junk), str(junk), "not an inrseg checkpoint")


def test_console_entry_point_exit_code_and_debug(tmp_path):
    """The real command (separate process): one line and exit 2; --debug shows the traceback."""
    cmd = [sys.executable, "-m", "inrseg", "data", "check", str(tmp_path / "missing")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    res = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr
