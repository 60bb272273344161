"""Bad data that used to pass silently, hang or crash (issue 22, the data side), as a table.

The corpus kinds follow :mod:`test_bad_input`: each builds its files, runs one ``inrseg`` command
in-process and asserts the exit code, exactly one ``error:`` line naming the file (or option) and
the problem, no traceback, the watched output unchanged (or absent) and every input byte for byte
as before. The pipes, sockets and devices are real (``os.mkfifo``, ``socket.bind``, ``/dev/zero``);
a kind that could block is limited to 30 s by pytest-timeout.

Below the table: the exact normalisation of images whose float32 statistics overflow (a voxel of
3e38, a uint64 image), and the check that ordinary images normalise bit for bit as before.
"""

from __future__ import annotations

import json
import shutil
import os
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_nnunet
from test_bad_input import Env, Scenario, _run_scenario, image, tiny_unet
from inrseg.data.nifti import load_image
from inrseg.data.phantoms.datasets import MIN_PHANTOM_EDGE, MIN_CARDIAC_SLICES
from inrseg.data.preprocess import normalize
from inrseg.methods.registry import ENTRIES, entry
from inrseg.methods.unet import UNetConfig, UNetSegmenter


# ============================================================================================
# helpers
# ============================================================================================

def _segment(env: Env, inp: Path, *extra, model: Path | None = None) -> list:
    return ["segment", "--model", model or env.model, "--input", inp, "--output", env.tmp / "out", *extra]


def _check(root: Path, *extra) -> Scenario:
    """``data check ROOT``: nothing is written; the dataset must stay as it was."""
    return Scenario(["data", "check", root, *extra], (), keep=(root,))


def _with_json(env: Env, needle: str, text: str | bytes | None = None, classes: int = 3, **fields) -> Scenario:
    """A tiny nnU-Net dataset (label maps of ``classes`` values) whose dataset.json is ``text``
    (or the default one with ``fields`` replaced; a field ``None`` is dropped); ``data check``
    must refuse it, naming the file."""
    root = write_nnunet(env.tmp / "ds", n=2, labels=dict(list({"background": 0, "a": 1, "b": 2}.items())[:classes]))
    meta_path = root / "dataset.json"
    if text is None:
        meta = json.loads(meta_path.read_text())
        for k, v in fields.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        text = json.dumps(meta)
    meta_path.write_bytes(text if isinstance(text, bytes) else text.encode())
    sc = _check(root)
    sc.needles = (str(meta_path), needle)
    return sc


def _with_splits(env: Env, spec, needle: str, command: str = "check") -> Scenario:
    """A dataset of 4 subjects and a splits file ``spec`` (JSON-dumped unless bytes/str)."""
    root = write_nnunet(env.tmp / "ds", n=4)
    splits = env.tmp / "splits.json"
    splits.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    if command == "check":
        sc = _check(root, "--splits", splits)
    else:
        out = env.tmp / "m" / "u.safetensors"
        sc = Scenario(["train", "unet", "--data", root, "--splits", splits, "--out", out, "--steps", "1"], (),
                      watch=env.tmp / "m", keep=(root,))
    sc.needles = (str(splits), needle)
    sc.keep = sc.keep + (splits,)
    return sc


def raw_nifti(path: Path, arr: np.ndarray, srow=None, pixdim=None, sform: int = 1, qform: int = 0) -> Path:
    """A ``.nii`` written byte by byte (nibabel's writer would "fix" a degenerate header):
    ``srow``: the sform's three rows; ``pixdim``: pixdim[1:]; the form codes as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = nib.Nifti1Header()
    h.set_data_dtype(arr.dtype)
    h.set_data_shape(arr.shape)
    h.set_sform(np.eye(4), code=sform)
    h.set_qform(np.eye(4), code=qform)
    if srow is not None:
        h["srow_x"], h["srow_y"], h["srow_z"] = srow
    if pixdim is not None:
        pd = h["pixdim"].copy()
        pd[1:1 + len(pixdim)] = pixdim
        h["pixdim"] = pd
    h.set_data_offset(352)
    path.write_bytes(h.binaryblock + b"\0" * 4 + arr.astype(arr.dtype.newbyteorder("<")).tobytes(order="F"))
    return path


def _noise(shape, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(dtype)


def _unet_small(env: Env) -> Path:
    """An untrained 2D U-Net of the default preset (unet-small: down-sampling 16)."""
    path = env.tmp / "unet-small.safetensors"
    UNetSegmenter(["background", "a", "b"], 2, 1, UNetConfig()).save(path)
    return path


# ============================================================================================
# the corpus: silent wrong results (numbers that overflow float32)
# ============================================================================================

def k_float64_image_beyond_float32(env):
    arr = _noise((24, 20, 1), np.float64)
    arr[3, 3, 0] = 1e300
    f = image(env.tmp / "in" / "big.nii.gz", arr)
    return Scenario(_segment(env, f), (str(f), "1e+300", "beyond float32"), env.tmp / "out", keep=(f,))


def k_scaled_int16_beyond_float32(env):
    img = nib.Nifti1Image((_noise((24, 20, 1)) * 1000).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(1e37, 0)
    f = env.tmp / "in" / "scaled.nii.gz"
    f.parent.mkdir()
    nib.save(img, f)
    return Scenario(_segment(env, f), (str(f), "beyond float32"), env.tmp / "out", keep=(f,))


def k_label_value_3e38(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    lab = root / "labelsTr" / "sub00_s0.nii.gz"
    arr = np.zeros((24, 20, 1), np.float32)
    arr[0, 0] = 3e38
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 1.0, 1.0])), lab)
    sc = _check(root)
    sc.needles = (str(lab), "larger than any label value")
    return sc


def k_uint64_label_that_wraps_to_minus_one(env):
    pred, gt = env.tmp / "pred", env.tmp / "gt"
    pred.mkdir()
    gt.mkdir()
    arr = np.zeros((24, 20, 1), np.uint64)
    arr[0, 0] = 2**64 - 1  # as int64 this is -1: the ignore value of the trainers
    nib.save(nib.Nifti1Image(arr, np.eye(4), dtype=np.uint64), pred / "c.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 1), np.uint8), np.eye(4)), gt / "c.nii.gz")
    return Scenario(["evaluate", "--pred", pred, "--gt", gt, "--out", env.tmp / "rep"],
                    (str(pred / "c.nii.gz"), "larger than any label value"), env.tmp / "rep", keep=(pred, gt))


# ============================================================================================
# the corpus: degenerate voxel sizes
# ============================================================================================

def _geometry(env, needle: str, **header) -> Scenario:
    f = raw_nifti(env.tmp / "in" / "odd.nii", _noise((24, 20, 1)), **header)
    return Scenario(_segment(env, f), (str(f), needle), env.tmp / "out", keep=(f,))


def k_pixdim_zero_without_forms(env):
    return _geometry(env, "pixdim[1] = 0", pixdim=[0, 1, 1], sform=0, qform=0)


def k_pixdim_negative_in_qform(env):
    return _geometry(env, "pixdim[2] = -1", pixdim=[1, -1, 1], sform=0, qform=1)


def k_pixdim_nan_beside_an_sform(env):
    return _geometry(env, "pixdim[1] = nan", pixdim=[np.nan, 1, 1])


def k_voxel_size_1e_minus_9_mm(env):
    return _geometry(env, "1e-09 mm", srow=[[1e-9, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])


def k_voxel_size_1e30_mm(env):
    return _geometry(env, "1e+30 mm", srow=[[1, 0, 0, 0], [0, 1e30, 0, 0], [0, 0, 1, 0]])


def k_voxel_axes_parallel(env):
    return _geometry(env, "parallel", srow=[[1, 1, 0, 0], [0, 1e-7, 0, 0], [0, 0, 1, 0]])


def k_time_step_nan(env):
    subject = _ukbb_subject(env.tmp / "ukbb" / "heart001", time_step=np.nan)
    sc = _check(env.tmp / "ukbb")
    sc.needles = (str(subject / "sa.nii"), "time step", "nan")
    return sc


# ============================================================================================
# the corpus: dataset.json fields
# ============================================================================================

def k_file_ending_a_number(env):
    return _with_json(env, "'file_ending'", file_ending=5)


def k_file_ending_not_nifti(env):
    return _with_json(env, "'file_ending' must be '.nii.gz' or '.nii'", file_ending=".png")


def k_channel_names_a_list(env):
    return _with_json(env, "'channel_names' must be an object", channel_names=["T1"])


def k_channel_names_name_to_index(env):
    return _with_json(env, "'channel_names' key 'T1' is not a channel index", channel_names={"T1": 0})


def k_channel_names_with_a_gap(env):
    return _with_json(env, "consecutive from 0", channel_names={"0": "T1", "2": "T2"})


def k_label_value_a_string(env):
    return _with_json(env, "'labels' -> 'a' must be an integer", labels={"background": 0, "a": "1", "b": 2})


def k_label_value_true(env):
    return _with_json(env, "'labels' -> 'a' must be an integer", labels={"background": 0, "a": True, "b": 2})


def k_label_value_fractional(env):
    return _with_json(env, "the number 1.5", classes=2, labels={"background": 0, "a": 1.5})


def k_two_names_for_one_label_value(env):
    return _with_json(env, "gives value 1 two names, 'a' and 'b'", classes=2, labels={"background": 0, "a": 1, "b": 1})


def k_duplicate_key_in_dataset_json(env):
    text = ('{"channel_names": {"0": "ch0"}, "labels": {"background": 0, "a": 1, "b": 2}, '
            '"labels": {"background": 0, "tumour": 1, "oedema": 2}, "file_ending": ".nii.gz"}')
    return _with_json(env, "key 'labels' appears twice", text)


def k_nan_in_dataset_json(env):
    text = ('{"channel_names": {"0": "ch0"}, "labels": {"background": 0, "a": 1, "b": 2}, '
            '"numTraining": NaN}')
    return _with_json(env, "NaN is not a JSON number", text)


def k_num_training_negative(env):
    return _with_json(env, "'numTraining'", numTraining=-2)


def k_time_axis_a_string(env):
    return _with_json(env, "'time_axis' must be true or false", time_axis="yes")


def k_name_a_list(env):
    return _with_json(env, "'name' must be a non-empty string", name=["x"])


def k_missing_channel_names_v1_modality(env):
    return _with_json(env, "nnU-Net v1's 'modality'", channel_names=None, modality={"0": "MRI"})


def k_dataset_json_nested_200000_deep(env):
    return _with_json(env, "nested too deeply", '{"labels": ' + "[" * 200_000 + "]" * 200_000 + "}")


def k_dataset_json_invalid_utf8(env):
    return _with_json(env, "not UTF-8", b'{"name": "caf\xe9", "labels": {}}')


def k_dataset_json_is_a_folder(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    (root / "dataset.json").unlink()
    (root / "dataset.json").mkdir()
    sc = _check(root)
    sc.needles = (str(root / "dataset.json"), "is a directory")
    return sc


def k_dataset_json_is_a_named_pipe(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    (root / "dataset.json").unlink()
    os.mkfifo(root / "dataset.json")
    sc = _check(root)
    sc.needles = (str(root / "dataset.json"), "named pipe")
    return sc


# ============================================================================================
# the corpus: the splits file
# ============================================================================================

def k_splits_subjects_a_list(env):
    return _with_splits(env, {"subjects": []}, "'subjects' must be an object")


def k_splits_subject_id_a_number(env):
    return _with_splits(env, {"subjects": {"sub00_s0": 3}}, "'subjects' -> 'sub00_s0'")


def k_splits_test_a_number(env):
    return _with_splits(env, {"test": 5}, "'test' must be a list of subject ids, not the number 5")


def k_splits_val_of_numbers(env):
    return _with_splits(env, {"val": [0, 1]}, "'val' must list subject ids")


def k_splits_unknown_key(env):
    return _with_splits(env, {"validation": ["sub00"]}, "unknown key 'validation'")


def k_splits_empty_object(env):
    return _with_splits(env, {}, "is empty")


def k_splits_subject_in_train_and_val(env):
    return _with_splits(env, {"train": ["sub00", "sub01"], "val": ["sub01"]}, "in both 'train' and 'val'")


def k_splits_train_without_val(env):
    return _with_splits(env, {"train": ["sub00"]}, "'train' is given without 'val'")


def k_splits_subject_listed_twice(env):
    return _with_splits(env, {"val": ["sub01", "sub01"]}, "lists subject 'sub01' twice")


def k_splits_unknown_test_subject(env):
    return _with_splits(env, {"test": ["sub99"]}, "not in the dataset")


def k_splits_every_subject_in_test(env):
    return _with_splits(env, {"test": ["sub00", "sub01", "sub02", "sub03"]}, "every subject is in 'test'")


def k_splits_every_subject_in_val(env):
    return _with_splits(env, {"val": ["sub00", "sub01", "sub02", "sub03"]}, "every subject is in 'val'",
                        command="train")


def k_splits_file_is_a_named_pipe(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    os.mkfifo(env.tmp / "splits.json")
    return Scenario(["data", "check", root, "--splits", env.tmp / "splits.json"],
                    (str(env.tmp / "splits.json"), "named pipe"), keep=(root,))


# ============================================================================================
# the corpus: entries that are not regular files; two files for one case
# ============================================================================================

def _odd_entry_in_images(env, make, needle: str, folder: str = "imagesTr", name: str = "sub99_s0_0000.nii.gz",
                         command: str = "check") -> Scenario:
    """A dataset with one odd entry ``folder/name`` made by ``make(path)``; the odd case has all
    its other files, so that a reader that does not refuse the entry opens it."""
    root = write_nnunet(env.tmp / "ds", n=2)
    if folder == "imagesTr":
        (root / "labelsTr" / "sub99_s0.nii.gz").write_bytes((root / "labelsTr" / "sub00_s0.nii.gz").read_bytes())
    odd = root / folder / name
    make(odd)
    if command == "check":
        sc = _check(root)
    else:
        sc = Scenario(["train", "unet", "--data", root, "--out", env.tmp / "m" / "u.safetensors", "--steps", "1"],
                      (), watch=env.tmp / "m", keep=(root,))
    sc.needles = (str(odd), needle)
    return sc


def _bind_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket file stays


def k_named_pipe_in_images_tr(env):
    return _odd_entry_in_images(env, os.mkfifo, "named pipe")


def k_named_pipe_in_images_tr_at_train(env):
    return _odd_entry_in_images(env, os.mkfifo, "named pipe", command="train")


def k_named_pipe_as_a_label_map(env):
    return _odd_entry_in_images(env, lambda p: (p.unlink(), os.mkfifo(p)), "named pipe", folder="labelsTr",
                                name="sub01_s0.nii.gz")


def k_socket_in_images_tr(env):
    if len(str(env.tmp / "ds" / "imagesTr" / "sub99_s0_0000.nii.gz")) > 100:
        pytest.skip("the temporary path is too long for a unix socket address")
    return _odd_entry_in_images(env, _bind_socket, "socket")


def k_device_linked_into_images_tr(env):
    return _odd_entry_in_images(env, lambda p: p.symlink_to("/dev/zero"), "character device")


def k_broken_link_in_images_tr(env):
    return _odd_entry_in_images(env, lambda p: p.symlink_to(p.parent / "gone.nii.gz"), "broken symbolic link")


def k_named_pipe_in_segment_input(env):
    image(env.tmp / "in" / "a.nii.gz")
    os.mkfifo(env.tmp / "in" / "b.nii.gz")
    return Scenario(_segment(env, env.tmp / "in"), (str(env.tmp / "in" / "b.nii.gz"), "named pipe"),
                    env.tmp / "out", keep=(env.tmp / "in",))


def k_named_pipe_as_segment_input(env):
    (env.tmp / "in").mkdir()
    os.mkfifo(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, env.tmp / "in" / "a.nii.gz"), (str(env.tmp / "in" / "a.nii.gz"), "named pipe"),
                    env.tmp / "out", keep=(env.tmp / "in",))


def _two_files_of_one_case(env, first: str, second: str, needle: str) -> Scenario:
    """Two files of one case id in a segment input; a 2-channel model would take them for the
    case's two channels."""
    image(env.tmp / "in" / first)
    image(env.tmp / "in" / second)
    model = tiny_unet(env.tmp / "u2.safetensors", in_channels=2)
    return Scenario(_segment(env, env.tmp / "in", model=model), (first, second, needle), env.tmp / "out",
                    keep=(env.tmp / "in",))


def k_nii_and_nii_gz_of_one_case_in_segment_input(env):
    return _two_files_of_one_case(env, "x.nii", "x.nii.gz", "names case 'x'")


def k_case_with_and_without_channel_suffix(env):
    return _two_files_of_one_case(env, "c.nii.gz", "c_0000.nii.gz", "names case 'c'")


def k_nii_and_nii_gz_of_one_case_in_predictions(env):
    """`evaluate` with x.nii and x.nii.gz in the prediction folder: refused, not one picked."""
    root = write_nnunet(env.tmp / "ds", n=2)
    pred = env.tmp / "pred"
    shutil.copytree(root / "labelsTr", pred)
    nib.save(nib.load(pred / "sub00_s0.nii.gz"), pred / "sub00_s0.nii")
    return Scenario(["evaluate", "--pred", pred, "--gt", root / "labelsTr", "--out", env.tmp / "rep"],
                    (str(pred), "names case 'sub00_s0'"), env.tmp / "rep", keep=(pred, root))


def _ukbb_subject(folder: Path, time_step: float = 0.1) -> Path:
    """A UK Biobank subject folder: a 8 x 8 x 4 x 3 cine ``sa.nii`` and its ``seg_sa.nii``."""
    raw_nifti(folder / "sa.nii", _noise((8, 8, 4, 3)), pixdim=[1, 1, 1, time_step])
    raw_nifti(folder / "seg_sa.nii", (_noise((8, 8, 4, 3)) * 3).astype(np.uint8), pixdim=[1, 1, 1, time_step])
    return folder


def k_ukbb_subject_with_sa_nii_and_sa_nii_gz(env):
    subject = _ukbb_subject(env.tmp / "ukbb" / "heart001")
    image(subject / "sa.nii.gz", _noise((8, 8, 4, 3)))
    sc = _check(env.tmp / "ukbb")
    sc.needles = (str(subject / "sa.nii"), "same image as sa.nii.gz")
    return sc


# ============================================================================================
# the corpus: images smaller than the network takes
# ============================================================================================

def k_image_2x2_at_segment(env):
    f = image(env.tmp / "in" / "tiny.nii.gz", _noise((2, 2, 1)))
    return Scenario(_segment(env, f), (str(f), "2 x 2 voxels", "3 voxels along one axis"), env.tmp / "out",
                    keep=(f,))


def k_image_4x4_at_segment_unet_small(env):
    f = image(env.tmp / "in" / "tiny.nii.gz", _noise((4, 4, 1)))
    return Scenario(_segment(env, f, model=_unet_small(env)), (str(f), "4 x 4 voxels", "17 voxels"),
                    env.tmp / "out", keep=(f,))


def k_image_4x4_at_train(env):
    root = write_nnunet(env.tmp / "ds", n=4, shape=(4, 4))
    out = env.tmp / "m" / "u.safetensors"
    return Scenario(["train", "unet", "--data", root, "--out", out, "--steps", "1"],
                    (str(root / "imagesTr"), "4 x 4 voxels", "17 voxels along one axis"), env.tmp / "m",
                    keep=(root,))


def k_small_validation_image_at_train(env):
    root = write_nnunet(env.tmp / "ds", n=4, shape=(24, 20))
    write_nnunet(env.tmp / "small", n=1, shape=(8, 8))
    small = root / "imagesTr" / "sub04_s0_0000.nii.gz"
    os.replace(env.tmp / "small" / "imagesTr" / "sub00_s0_0000.nii.gz", small)
    os.replace(env.tmp / "small" / "labelsTr" / "sub00_s0.nii.gz", root / "labelsTr" / "sub04_s0.nii.gz")
    splits = env.tmp / "splits.json"
    splits.write_text(json.dumps({"val": ["sub04"]}))
    return Scenario(["train", "unet", "--data", root, "--splits", splits, "--out", env.tmp / "m" / "u.safetensors",
                     "--steps", "1"], (str(small), "8 x 8 voxels", "17 voxels"), env.tmp / "m", keep=(root, splits))


def k_phantom_shape_4_4(env):
    return Scenario(["data", "phantom", "--kind", "brain2d", "--n", "1", "--shape", "4,4", "--out", env.tmp / "ph"],
                    ("phantom shape 4,4", f"at least {MIN_PHANTOM_EDGE} voxels"), env.tmp / "ph")


def k_phantom_cardiac_frames_16_16_4(env):
    return Scenario(["data", "phantom", "--kind", "cardiac", "--n", "1", "--shape", "16,16,4", "--out", env.tmp / "ph"],
                    ("phantom shape 16,16,4", f"at least {MIN_PHANTOM_EDGE} voxels along every in-plane axis"),
                    env.tmp / "ph")


CORPUS = {name[2:]: fn for name, fn in globals().items() if name.startswith("k_")}
#: kinds that would block forever on the bug they test (a reader opening a named pipe)
BLOCKING = {name for name in CORPUS if "named_pipe" in name}


def test_corpus_size():
    assert len(CORPUS) >= 40, len(CORPUS)


@pytest.fixture(scope="module")
def model2d(tmp_path_factory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("ckpt") / "unet.safetensors")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.timeout(30 if n in BLOCKING else 300))
                                  for n in sorted(CORPUS)])
def test_bad_data(name, cli, tmp_path, model2d, monkeypatch):
    _run_scenario(CORPUS[name], cli, tmp_path, model2d, monkeypatch)


# ============================================================================================
# numbers: exact where float32 overflows, bit for bit as before elsewhere
# ============================================================================================

def _old_normalize(image: np.ndarray, mode: str) -> np.ndarray:
    """The normalisation as it was before the float64 path (the equivalence fixtures' numbers)."""
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        if mode == "zscore":
            mask = x != 0
            vals = x[mask] if mask.sum() > 0.05 * x.size else x.ravel()
            mu, sd = float(vals.mean()), float(vals.std())
            out[c] = (x - mu) / (sd if sd > 1e-8 else 1.0)
        else:
            lo, hi = np.percentile(x, [0.5, 99.5])
            out[c] = np.clip((x - lo) / (hi - lo if hi - lo > 1e-8 else 1.0), 0.0, 1.0)
    return out


def _exact_zscore(x: np.ndarray) -> np.ndarray:
    """The z-score of :func:`normalize`'s rule (statistics over the non-zero voxels), in plain
    float64 (one channel): the reference."""
    x = x.astype(np.float64)
    mask = x != 0
    vals = x[mask] if mask.sum() > 0.05 * x.size else x.ravel()
    return ((x - vals.mean()) / vals.std()).astype(np.float32)


ORDINARY = {
    "uniform": lambda r: r.random((2, 24, 20)),
    "skull_stripped": lambda r: np.where(r.random((1, 16, 16, 8)) > 0.6, r.normal(300, 40, (1, 16, 16, 8)), 0),
    "ct_like": lambda r: r.normal(-500, 400, (1, 32, 30)),
    "constant_foreground": lambda r: np.where(r.random((1, 20, 20)) > 0.5, 7.0, 0.0),
    "int16_range": lambda r: r.integers(-32768, 32767, (1, 24, 24)),
}


@pytest.mark.parametrize("mode", ["zscore", "minmax"])
@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_images_normalise_bit_for_bit_as_before(name, mode):
    x = ORDINARY[name](np.random.default_rng(5)).astype(np.float32)
    np.testing.assert_array_equal(normalize(x, mode), _old_normalize(x, mode))


def _with_voxel(value: float):
    def make(r):
        x = r.random((1, 24, 20)).astype(np.float32)
        x[0, 3, 3] = value
        return x
    return make


OVERFLOWING = {
    "one_voxel_3e38": _with_voxel(3e38),
    "one_voxel_minus_3e38": _with_voxel(-3e38),
    "uint64_full_range": lambda r: (r.random((1, 24, 20)) * 2.0**64).astype(np.uint64).astype(np.float32),
    "all_near_float32_max": lambda r: (1e38 + r.random((1, 16, 16)) * 2e38).astype(np.float32),
    "spread_below_float32_resolution": lambda r: (r.random((1, 24, 20)) * 1e-12).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(OVERFLOWING))
def test_zscore_is_exact_where_float32_statistics_overflow(name):
    x = OVERFLOWING[name](np.random.default_rng(7))
    with np.errstate(all="ignore"):
        old = _old_normalize(x, "zscore")
    assert not (np.isfinite(old).all() and old.std() > 0.5)  # what it was: zeros, NaN or no contrast
    z = normalize(x, "zscore")
    assert np.isfinite(z).all() and z.std() > 0.1
    np.testing.assert_allclose(z, _exact_zscore(x[0])[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OVERFLOWING))
def test_minmax_stays_in_0_1_where_float32_overflows(name):
    x = OVERFLOWING[name](np.random.default_rng(7))
    m = normalize(x, "minmax")
    assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 and m.std() > 0.01


def test_uint64_nifti_is_read_and_z_scored_exactly(tmp_path):
    """A uint64 image through the reader: finite float32 voxels, a z-score that is not all zeros."""
    arr = (np.random.default_rng(3).random((24, 20, 1)) * 2.0**63).astype(np.uint64)
    f = tmp_path / "u64.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4), dtype=np.uint64), f)
    vol = load_image(f)
    z = normalize(vol.data)
    assert np.isfinite(z).all() and abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    np.testing.assert_allclose(z[0], _exact_zscore(arr[..., 0].astype(np.float32)), rtol=1e-5, atol=1e-5)


def test_an_image_with_a_3e38_voxel_gets_its_exact_z_score_at_segment(cli, tmp_path, model2d):
    """The 3e38 voxel no longer z-scores the image to zeros: every voxel gets its exact z-score
    (the outlier about +22, the rest about -0.05), and segment runs on that."""
    arr = _noise((24, 20, 1))
    arr[3, 3, 0] = 3e38
    f = image(tmp_path / "in" / "hot.nii.gz", arr)
    z = normalize(load_image(f).data)
    np.testing.assert_allclose(z[0], _exact_zscore(arr[..., 0]), rtol=1e-5)
    assert z[0, 3, 3] > 20 and -0.1 < z[0, 0, 0] < -0.01
    assert cli("segment", "--model", model2d, "--input", f, "--output", tmp_path / "out").code == 0


# ============================================================================================
# the minimum sizes: the phantom rule agrees with the methods
# ============================================================================================

@pytest.mark.parametrize("method", sorted(ENTRIES))
def test_the_smallest_phantom_is_taken_by_every_method(method):
    """Every method, with its default config, takes the smallest phantom images (2D, 3D and the
    cardiac frames); a method that segments 3D + t takes the smallest cine."""
    e = entry(method)
    recipe = e.config_recipe
    shapes = {2: [(MIN_PHANTOM_EDGE,) * 2], 3: [(MIN_PHANTOM_EDGE,) * 3, (MIN_PHANTOM_EDGE,) * 2 + (MIN_CARDIAC_SLICES,)],
              4: [(4, 4, MIN_CARDIAC_SLICES, 2)]}
    for nd in e.cls.spatial_ndims:
        model = e.cls(["background", "a"], nd, 1, recipe.make(recipe.default_preset(nd), nd, {}))
        for shape in shapes[nd]:
            model.check_image_size(shape, Path("x.nii.gz"))
