"""Image formats beyond NIfTI (issue 24 item 5): NRRD, MetaImage and DICOM series in, through
SimpleITK, with the geometry nibabel would give; label maps out as NIfTI, in the input's format,
or as DICOM SEG (highdicom, an optional extra).

Every phantom here is written by SimpleITK itself (and, for the reference, as NIfTI by
SimpleITK), so the comparison with nibabel's affine checks inrseg's LPS -> RAS conversion and
voxel order, not a round trip through inrseg's own writer.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from test_bad_input import assert_one_line_error
from inrseg.data.layouts import case_id_of, image_files, open_dataset
from inrseg.data.nifti import grid_shape_of, load_image, load_labels
from inrseg.data.sitk_io import affine_from_lps, dicom_series, lps_from_affine, save_sitk_labels
from inrseg.data.volume import Volume
from inrseg.methods.unet import UNetConfig, UNetSegmenter

NAMES = ["background", "left thing", "right thing"]
#: a phantom grid (x, y, z): small, with distinct sizes so that a transposed axis is caught
SHAPE = (16, 12, 8)
SPACING = (0.7, 1.1, 2.5)
ORIGIN = (10.0, -20.0, 30.0)


def _rotation() -> np.ndarray:
    """A proper rotation about two axes: no axis of the grid is a world axis."""
    a, b = 0.3, 0.5
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _phantom() -> np.ndarray:
    """An int16 image ``SHAPE`` (x, y, z): an off-centre bright ball on noise."""
    grids = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    r = np.sqrt((grids[0] - 5) ** 2 + (grids[1] - 7) ** 2 + (grids[2] - 3) ** 2)
    noise = np.random.default_rng(0).integers(0, 40, SHAPE)
    return (np.where(r < 4, 600, 100) + noise).astype(np.int16)


def _sitk_image(arr: np.ndarray, direction: np.ndarray | None = None) -> sitk.Image:
    """``arr`` (x, y, z) as a SimpleITK image with the phantom geometry (LPS)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple((_rotation() if direction is None else direction).ravel()))
    return img


def _uid() -> str:
    """A fresh DICOM UID (the UUID form, 2.25.<integer>)."""
    return f"2.25.{uuid.uuid4().int}"


def _dicom_series(img: sitk.Image, folder: Path) -> str:
    """Write ``img`` (int16, orthonormal direction) as a CT series, one file per slice; returns
    its SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = _uid(), _uid(), _uid()
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": _uid(),
                "0020|000d": study_uid, "0020|000e": series_uid, "0020|0052": frame_uid, "0010|0010": "Phantom^Test",
                "0010|0020": "P1", "0020|0011": "1", "0020|0013": str(k + 1), "0018|0050": str(SPACING[2]),
                "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return series_uid


@pytest.fixture
def model(tmp_path) -> Path:
    """A tiny untrained 3D U-Net: deterministic, so equal inputs give equal labels."""
    path = tmp_path / "m.safetensors"
    UNetSegmenter(list(NAMES), 3, 1, UNetConfig(channels=(4, 8), num_res_units=0)).save(path)
    return path


def _segment(cli, model: Path, inp: Path, out: Path, *extra: str):
    return cli("segment", "--model", model, "--input", inp, "--output", out, "--device", "cpu", *extra)


def _nifti_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


# ============================================================================================
# geometry: inrseg's affine of a SimpleITK file is nibabel's of the same image as NIfTI
# ============================================================================================

def test_lps_affine_is_nibabel_affine_with_two_rows_negated():
    """The conversion itself: the first two rows of ITK's LPS matrix negated, and its inverse."""
    rot = _rotation()
    affine = affine_from_lps(ORIGIN, SPACING, rot.ravel())
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = rot @ np.diag(SPACING), ORIGIN
    assert np.allclose(affine, np.diag([-1, -1, 1, 1]) @ lps)
    origin, spacing, direction = lps_from_affine(affine)
    assert np.allclose(origin, ORIGIN) and np.allclose(spacing, SPACING) and np.allclose(direction, rot.ravel())


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_sitk_file_affine_matches_nibabel(tmp_path, suffix):
    """A phantom with an oblique direction and an origin, written by SimpleITK as ``suffix``,
    reads with the affine nibabel gives for it written as NIfTI by SimpleITK, and the same
    voxels in the same order; the grid shape from the header alone agrees."""
    arr = _phantom().astype(np.float32)
    img = _sitk_image(arr)
    sitk.WriteImage(img, str(tmp_path / f"x{suffix}"))
    sitk.WriteImage(img, str(tmp_path / "x.nii.gz"))
    ref = nib.load(str(tmp_path / "x.nii.gz"))
    vol = load_image(tmp_path / f"x{suffix}")
    assert vol.shape == SHAPE and vol.spatial_ndim == 3
    assert np.allclose(vol.affine, ref.affine, atol=1e-5)
    assert np.array_equal(vol.data[0], np.asarray(ref.dataobj, dtype=np.float32))
    assert np.allclose(vol.spacing, SPACING)
    assert grid_shape_of(tmp_path / f"x{suffix}") == SHAPE


def test_2d_and_3d_plus_time_files(tmp_path):
    """A 2D NRRD reads as an H x W x 1 grid with nibabel's affine; a 4D MetaImage as 3D + t
    with its fourth spacing as the time step."""
    arr = np.random.default_rng(1).random((9, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr.T)
    img.SetSpacing((0.5, 2.0))
    img.SetOrigin((3.0, -4.0))
    img.SetDirection((0.0, -1.0, 1.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "s.nrrd"))
    sitk.WriteImage(img, str(tmp_path / "s.nii.gz"))
    vol = load_image(tmp_path / "s.nrrd", expect_ndim=2)
    ref = nib.load(str(tmp_path / "s.nii.gz"))
    assert vol.shape == (9, 7) and np.allclose(vol.affine, ref.affine, atol=1e-5)
    assert np.array_equal(vol.data[0], arr)
    cine = np.random.default_rng(2).random((6, 5, 4, 3)).astype(np.float32)  # x, y, z, t
    img4 = sitk.GetImageFromArray(cine.T, isVector=False)
    img4.SetSpacing((1.0, 1.5, 2.0, 0.04))
    sitk.WriteImage(img4, str(tmp_path / "c.mha"))
    vol4 = load_image(tmp_path / "c.mha", expect_ndim=4)
    assert vol4.shape == (6, 5, 4, 3) and vol4.time_step == pytest.approx(0.04)
    assert np.allclose(vol4.spacing, (1.0, 1.5, 2.0)) and np.array_equal(vol4.data[0], cine)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("ndim", [2, 3, 4])
def test_label_maps_written_by_sitk_read_back(tmp_path, suffix, ndim):
    """:func:`save_sitk_labels` writes a 2D, 3D or 3D + t label map that reads back with the
    same values, affine and time step, and whose file SimpleITK places where nibabel's affine
    says (LPS = RAS with two rows negated)."""
    shape = {2: (9, 7), 3: SHAPE, 4: (6, 5, 4, 3)}[ndim]
    affine = affine_from_lps(ORIGIN, SPACING, _rotation().ravel())
    like = Volume(np.zeros(shape, np.int64), affine, ndim, time_step=0.04 if ndim == 4 else None)
    labels = np.random.default_rng(3).integers(0, 3, shape)
    path = save_sitk_labels(labels, tmp_path / f"l{suffix}", like)
    back = load_labels(path, expect_ndim=ndim)
    assert np.array_equal(back.data, labels) and np.allclose(back.affine, affine)
    assert back.time_step == (pytest.approx(0.04) if ndim == 4 else None)
    img = sitk.ReadImage(str(path))
    assert np.allclose(img.GetOrigin()[:3], ORIGIN) and np.allclose(img.GetSpacing()[:3], SPACING)


def test_dicom_series_reads_with_its_geometry(tmp_path):
    """A DICOM series written by SimpleITK, one file per slice, reads as the phantom with the
    affine nibabel gives for the same image as NIfTI; a folder of series folders is one case
    per series, named by its folder."""
    img = _sitk_image(_phantom())
    uid = _dicom_series(img, tmp_path / "series" / "caseA")
    _dicom_series(img, tmp_path / "series" / "caseB")
    sitk.WriteImage(img, str(tmp_path / "ref.nii.gz"))
    ref = nib.load(str(tmp_path / "ref.nii.gz"))
    vol = load_image(tmp_path / "series" / "caseA")
    assert vol.shape == SHAPE and np.allclose(vol.affine, ref.affine, atol=1e-4)
    assert np.array_equal(vol.data[0], _phantom())
    assert dicom_series(tmp_path / "series" / "caseA")[0] == uid
    groups = image_files(tmp_path / "series")
    assert [case_id_of(g) for g in groups] == ["caseA", "caseB"]
    assert image_files(tmp_path / "series" / "caseA") == [[tmp_path / "series" / "caseA"]]


# ============================================================================================
# segment: NRRD / MHA / DICOM give the labels and geometry of the same image as NIfTI
# ============================================================================================

def _inputs(tmp_path: Path) -> dict[str, Path]:
    """The phantom as NIfTI (written by SimpleITK), NRRD, MHA, MHD (+ its .raw) and a DICOM series."""
    img = _sitk_image(_phantom())
    paths = {"nifti": tmp_path / "in" / "nifti" / "case.nii.gz", "nrrd": tmp_path / "in" / "nrrd" / "case.nrrd",
             "mha": tmp_path / "in" / "mha" / "case.mha", "mhd": tmp_path / "in" / "mhd" / "case.mhd"}
    for p in paths.values():
        p.parent.mkdir(parents=True)
        sitk.WriteImage(img, str(p))
    paths["dicom"] = tmp_path / "in" / "dicom" / "case"
    _dicom_series(img, paths["dicom"])
    return paths


def test_segment_sitk_inputs_match_nifti(tmp_path, cli, model):
    """The same phantom as NRRD, MHA, MHD and a DICOM series segments to the labels and the affine
    of the NIfTI (the default output format: NIfTI)."""
    inputs = _inputs(tmp_path)
    results = {}
    for kind, path in inputs.items():
        res = _segment(cli, model, path, tmp_path / f"out_{kind}")
        assert res.code == 0, res.err
        assert sorted(p.name for p in (tmp_path / f"out_{kind}").iterdir()) == ["case.nii.gz"]
        results[kind] = _nifti_labels(tmp_path / f"out_{kind}" / "case.nii.gz")
    labels, affine = results.pop("nifti")
    assert labels.shape == SHAPE and len(np.unique(labels)) > 1  # a real label map, not a constant
    for kind, (other, other_affine) in results.items():
        assert np.array_equal(other, labels), kind
        assert np.allclose(other_affine, affine, atol=1e-4), kind


def test_output_format_input_keeps_format_and_geometry(tmp_path, cli, model):
    """``--output-format input``: a .nrrd input gives a .nrrd label map, a .mha one a .mha, a
    .mhd one a .mha too (one file, not a header and its data), on the input's exact geometry
    (origin, spacing, direction) and with the NIfTI run's labels; a DICOM series gives NIfTI,
    saying so."""
    inputs = _inputs(tmp_path)
    assert _segment(cli, model, inputs["nifti"], tmp_path / "ref").code == 0
    labels, _ = _nifti_labels(tmp_path / "ref" / "case.nii.gz")
    for kind, suffix in (("nrrd", ".nrrd"), ("mha", ".mha"), ("mhd", ".mha")):
        res = _segment(cli, model, inputs[kind], tmp_path / f"out_{kind}", "--output-format", "input")
        assert res.code == 0, res.err
        written = tmp_path / f"out_{kind}" / f"case{suffix}"
        assert sorted(p.name for p in written.parent.iterdir()) == [written.name]
        src, out = sitk.ReadImage(str(inputs[kind])), sitk.ReadImage(str(written))
        assert np.allclose(out.GetOrigin(), src.GetOrigin()) and np.allclose(out.GetSpacing(), src.GetSpacing())
        assert np.allclose(out.GetDirection(), src.GetDirection())
        assert np.array_equal(sitk.GetArrayFromImage(out).T, labels)
        assert np.array_equal(load_labels(written).data, labels)  # and inrseg reads it back
    res = _segment(cli, model, inputs["dicom"], tmp_path / "out_dicom", "--output-format", "input")
    assert res.code == 0 and "written as NIfTI" in res.err
    assert [p.name for p in (tmp_path / "out_dicom").iterdir()] == ["case.nii.gz"]


# ============================================================================================
# DICOM SEG
# ============================================================================================

def test_dicom_seg_references_the_series(tmp_path, cli, model):
    """``--output-format dicom-seg``: one DICOM SEG per case that opens in highdicom, references
    the source series (its SeriesInstanceUID and slices), holds one segment per foreground
    class named by the model's labels, and the NIfTI run's labels frame by frame."""
    hd = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    img = _sitk_image(_phantom())
    uid = _dicom_series(img, tmp_path / "in" / "case")
    assert _segment(cli, model, tmp_path / "in" / "case", tmp_path / "ref").code == 0
    labels, _ = _nifti_labels(tmp_path / "ref" / "case.nii.gz")
    res = _segment(cli, model, tmp_path / "in" / "case", tmp_path / "out", "--output-format", "dicom-seg")
    assert res.code == 0, res.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case.dcm"]
    seg = hd.seg.segread(str(tmp_path / "out" / "case.dcm"))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series(tmp_path / "in" / "case")[1]]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    numbers = list(seg.get_segment_numbers())
    assert numbers == [1, 2]
    assert [seg.get_segment_description(n).segment_label for n in numbers] == NAMES[1:]
    frames = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True,
                                               relabel=False)
    assert np.array_equal(frames.transpose(2, 1, 0), labels)  # (slices, rows, columns) -> (x, y, z)


def test_dicom_seg_refusals(tmp_path, cli, model, monkeypatch):
    """``dicom-seg`` is refused in one line, nothing written: for a non-DICOM input, with
    --scale, and without highdicom (naming the extra to install)."""
    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(_segment(cli, model, inputs["nrrd"], out, "--output-format", "dicom-seg"),
                          str(inputs["nrrd"]), "DICOM series inputs")
    assert_one_line_error(_segment(cli, model, inputs["dicom"], out, "--output-format", "dicom-seg",
                                   "--scale", "2"), "--scale")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    assert_one_line_error(_segment(cli, model, inputs["dicom"], out, "--output-format", "dicom-seg"),
                          "pip install 'inrseg[dicom]'")
    assert not out.exists()


# ============================================================================================
# layouts and data check
# ============================================================================================

@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_nnunet_dataset_in_sitk_format(tmp_path, cli, ending):
    """An nnU-Net dataset with ``"file_ending": ".nrrd"`` (or ``.mha``) opens, its cases load
    with image and labels on one grid, and ``data check`` validates it."""
    root = tmp_path / "ds"
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        sitk.WriteImage(_sitk_image(rng.normal(size=SHAPE).astype(np.float32)),
                        str(root / "imagesTr" / f"sub{i:02d}_0000{ending}"))
        sitk.WriteImage(_sitk_image(rng.integers(0, 3, SHAPE).astype(np.uint8)),
                        str(root / "labelsTr" / f"sub{i:02d}{ending}"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ending,
                                                   "labels": dict(zip(NAMES, range(3))), "numTraining": 2}))
    ds = open_dataset(root)
    assert ds.spatial_ndim == 3 and [c.case_id for c in ds.train] == ["sub00", "sub01"]
    image, labels = ds.train[0].load()
    assert image.shape == labels.shape == SHAPE and np.allclose(image.affine, labels.affine)
    res = cli("data", "check", root)
    assert res.code == 0, res.err
    assert json.loads(res.out)["n_train"] == 2


# ============================================================================================
# bad inputs: one line, exit 2, nothing written
# ============================================================================================

def _corrupt_nrrd(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    f = tmp_path / "in" / "case.nrrd"
    f.parent.mkdir()
    sitk.WriteImage(_sitk_image(_phantom()), str(f))
    f.write_bytes(f.read_bytes()[:-200])
    return f, (str(f), "NRRD")


def _garbage_mha(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    f = tmp_path / "in" / "case.mha"
    f.parent.mkdir()
    f.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 16 12 8\nElementType = MET_FLOAT\n"
                  b"ElementDataFile = LOCAL\n" + b"\0" * 100)
    return f, (str(f), "MetaImage", "not read completely")


def _huge_nrrd(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    f = tmp_path / "in" / "case.nrrd"
    f.parent.mkdir()
    f.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nendian: little\n"
                  b"encoding: gzip\n\n" + b"\0" * 100)
    return f, (str(f), "GiB of memory")


def _empty_dicom_folder(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    folder = tmp_path / "in" / "series"
    folder.mkdir(parents=True)
    return folder, (str(folder), "empty", "DICOM")


def _no_dicom_in_folder(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    folder = tmp_path / "in" / "series"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # the magic, then nothing
    return folder, (str(folder), "DICOM")


def _two_series(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    folder = tmp_path / "in" / "series"
    img = _sitk_image(_phantom())
    _dicom_series(img[:, :, :3], folder / "a")
    _dicom_series(img[:, :, 3:6], folder / "b")
    for f in (folder / "b").iterdir():
        f.rename(folder / "a" / f"b_{f.name}")
    return folder / "a", (str(folder / "a"), "2 DICOM series")


@pytest.mark.parametrize("build", [_corrupt_nrrd, _garbage_mha, _huge_nrrd, _empty_dicom_folder, _no_dicom_in_folder,
                                   _two_series], ids=lambda f: f.__name__.strip("_"))
def test_bad_inputs_are_one_line(tmp_path, cli, model, build):
    """A corrupt .nrrd, an unreadable .mha, a header claiming more memory than there is, an
    empty folder, a folder without a DICOM image, two series in one folder: one line naming the
    input, exit 2, no output."""
    inp, needles = build(tmp_path)
    res = _segment(cli, model, inp, tmp_path / "out")
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "out").exists()
