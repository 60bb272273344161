"""NIfTI reading/writing: affine, spacing, dtype and 2D/4D conventions survive a round trip."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from inrseg.core.files import atomic_path
from inrseg.data.nifti import load_image, load_labels, save_image, save_labels
from inrseg.data.volume import Volume
from inrseg.core.errors import InputError


def _affine(spacing):
    a = np.eye(4)
    a[:3, :3] = np.diag(spacing)
    a[:3, 3] = [-10.0, 5.0, 2.5]
    return a


def test_2d_file_is_h_w_1_and_round_trips(tmp_path):
    arr = np.arange(12 * 10, dtype=np.float32).reshape(12, 10, 1)
    aff = _affine([0.8, 1.2, 3.0])
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "img.nii.gz")
    img = load_image(tmp_path / "img.nii.gz")
    assert img.spatial_ndim == 2 and img.data.shape == (1, 12, 10) and img.shape == (12, 10)
    assert img.spacing == pytest.approx((0.8, 1.2))
    lab = (arr[..., 0] > 50).astype(np.int64)
    save_labels(lab, tmp_path / "lab.nii.gz", like=img)
    back = nib.load(tmp_path / "lab.nii.gz")
    assert back.shape == (12, 10, 1)            # written back as H x W x 1
    np.testing.assert_allclose(back.affine, aff)  # overlays the source image
    assert back.get_data_dtype() == np.uint8
    assert int(back.header["sform_code"]) == 1
    np.testing.assert_array_equal(load_labels(tmp_path / "lab.nii.gz").data, lab)


def test_int16_scaled_image_keeps_dtype_and_values(tmp_path):
    arr = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = nib.Nifti1Image(arr, _affine([2, 2, 2]))
    img.set_data_dtype(np.int16)
    nib.save(img, tmp_path / "a.nii.gz")
    vol = load_image(tmp_path / "a.nii.gz")
    assert vol.dtype == np.int16 and vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data[0], arr, atol=1e-4)
    save_image(vol, tmp_path / "b.nii.gz")
    again = nib.load(tmp_path / "b.nii.gz")
    assert again.get_data_dtype() == np.int16
    np.testing.assert_allclose(again.get_fdata(), arr, atol=1e-4)
    np.testing.assert_allclose(again.affine, vol.affine)


def test_multichannel_and_4d(tmp_path):
    aff = _affine([1.8, 1.8, 8.0])
    for c in range(2):
        arr = c + np.arange(6 * 7 * 3, dtype=np.float32).reshape(6, 7, 3) / 1000
        nib.save(nib.Nifti1Image(arr, aff), tmp_path / f"x_{c:04d}.nii.gz")
    vol = load_image([tmp_path / "x_0000.nii.gz", tmp_path / "x_0001.nii.gz"], expect_ndim=3)
    assert vol.data.shape == (2, 6, 7, 3) and vol.data[1].min() == 1
    cine = nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 3, 5)).astype(np.float32), aff)
    cine.header.set_zooms((1.8, 1.8, 8.0, 0.04))
    nib.save(cine, tmp_path / "sa.nii.gz")
    v4 = load_image(tmp_path / "sa.nii.gz", expect_ndim=4)
    assert v4.shape == (6, 7, 3, 5) and v4.spacing == pytest.approx((1.8, 1.8, 8.0))
    assert v4.time_step == pytest.approx(0.04)
    with pytest.raises(InputError, match="expected 3D"):
        load_image(tmp_path / "sa.nii.gz", expect_ndim=3)
    save_labels(np.ones((6, 7, 3, 5), np.int64), tmp_path / "seg.nii.gz", like=v4.with_data(v4.data[0]))
    assert nib.load(tmp_path / "seg.nii.gz").header.get_zooms()[3] == pytest.approx(0.04)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_volume_shape_helpers():
    v = Volume(np.zeros((2, 5, 6, 7), np.float32), np.eye(4), 3)
    assert v.shape == (5, 6, 7) and not v.is_label
    assert v.with_data(np.zeros((5, 6, 7), np.int64)).is_label


def test_reader_survives_a_header_whose_data_start_inside_it(tmp_path):
    """Found by the fuzz run (benchmarks/fuzz_nifti.py): vox_offset 0, the data inside the
    header block; nibabel raised WrapStructError. Now read, or refused as InputError."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((2, 2, 1))
    raw = bytearray(hdr.binaryblock) + bytes(4) + np.arange(1, 5, dtype=np.float32).tobytes()
    raw[108:112] = np.float32(0).tobytes()  # vox_offset = 0
    for name, payload in (("a.nii", bytes(raw)), ("b.nii.gz", gzip.compress(bytes(raw)))):
        (tmp_path / name).write_bytes(payload)
        try:
            load_image(tmp_path / name)
        except InputError as exc:
            assert name in str(exc)
