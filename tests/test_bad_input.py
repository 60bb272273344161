"""The bad-input corpus: every kind of bad input, fault and misuse a user has hit, as a table.

Each kind builds its files, runs one ``inrseg`` command in-process and asserts:
- the exit code (2 for bad input or usage, 1 for a failing machine: disk full, no memory);
- exactly one line on stderr, ``error: ...``, naming the file (or option) and the problem,
  and no traceback;
- the output folder it watches is unchanged (byte for byte), or still absent.

Faults that are not a single command (SIGINT, a killed write, concurrent writers, the umask)
have their own tests below the table.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import write_nnunet
from inrseg.engine.checkpoints import save_checkpoint
from inrseg.core.errors import InputError
from inrseg.methods.unet import UNetConfig, UNetSegmenter

NAMES = ["background", "a", "b"]


# ============================================================================================
# helpers
# ============================================================================================

def assert_one_line_error(res, *needles: str, code: int = 2) -> None:
    """Exit ``code``; stderr ends with the only ``error:`` line (status lines such as "loading
    ..." may come before it), which holds every needle; no traceback."""
    assert res.code == code, (res.code, res.err)
    lines = [ln for ln in res.err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.err
    assert "Traceback" not in res.err, res.err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def snapshot(folder: Path | None) -> dict | None:
    """Every file under ``folder`` (hidden ones too) with its SHA-1; ``None`` if absent."""
    if folder is None or not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def image(path: Path, arr: np.ndarray | None = None, affine=None) -> Path:
    """A NIfTI image (random 24 x 20 x 1 float32 by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr is None:
        arr = np.random.default_rng(0).random((24, 20, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), path)
    return path


def tiny_unet(path: Path, in_channels: int = 1, names=NAMES, ndim: int = 2) -> Path:
    UNetSegmenter(list(names), ndim, in_channels, UNetConfig(channels=(4, 8), num_res_units=0)).save(path)
    return path


def lying_checkpoint(src: Path, dst: Path, **changes) -> Path:
    """``src``'s weights with a header that is valid JSON but changed (``key=None`` drops it)."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["inrseg"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(tensors, str(dst), metadata={"inrseg": json.dumps(meta)})
    return dst


def nifti_header_claiming(shape, nifti2: bool = False) -> bytes:
    """A NIfTI header claiming ``shape`` float32 voxels, followed by only 64 bytes of data."""
    klass = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    h = klass()
    h.set_data_dtype(np.float32)
    h.set_data_shape(shape)
    raw = io.BytesIO()
    h.write_to(raw)
    raw.write(b"\0" * (int(h.get_data_offset()) - raw.tell()) + b"\1" * 64)
    return raw.getvalue()


def _snapshot_any(path: Path) -> dict | str | None:
    """:func:`snapshot` of a folder, or the SHA-1 of a file (``None`` if absent)."""
    if path.is_dir():
        return snapshot(path)
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else None


@dataclass
class Scenario:
    """One command against bad input: its arguments, what the error line must name, the
    folder that must stay unchanged, the expected exit code and environment changes."""

    args: list
    needles: tuple[str, ...]
    watch: Path | None = None
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    #: inputs (files or folders) that must be byte-for-byte as before the command
    keep: tuple[Path, ...] = ()


@dataclass
class Env:
    tmp: Path
    model: Path            # a tiny untrained 2D U-Net checkpoint (1 channel, 3 classes)
    cli: Callable


# ============================================================================================
# the corpus: name -> builder(Env) -> Scenario
# ============================================================================================

def _segment(env: Env, inp: Path, *extra, model: Path | None = None) -> list:
    return ["segment", "--model", model or env.model, "--input", inp, "--output", env.tmp / "out", *extra]


def k_truncated_gzip(env):
    f = image(env.tmp / "in" / "case.nii.gz")
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return Scenario(_segment(env, f), (str(f), "truncated"), env.tmp / "out")


def k_corrupt_deflate_stream(env):
    f = image(env.tmp / "in" / "case.nii.gz")
    raw = bytearray(f.read_bytes())
    raw[40:60] = b"\x00" * 20
    f.write_bytes(bytes(raw))
    return Scenario(_segment(env, f), (str(f),), env.tmp / "out")


def k_gzip_crc_wrong_but_inflates(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    f = root / "imagesTr" / "sub01_s0_0000.nii.gz"
    raw = bytearray(f.read_bytes())
    raw[-6] ^= 0xFF  # a CRC-32 byte of the gzip trailer: the deflate stream itself is intact
    f.write_bytes(bytes(raw))
    return Scenario(["data", "check", root], (str(f), "CRC"))


def k_gzip_crc_wrong_in_train(env):
    root = write_nnunet(env.tmp / "ds", n=4)
    f = root / "imagesTr" / "sub02_s0_0000.nii.gz"
    raw = bytearray(f.read_bytes())
    raw[-7] ^= 0x55
    f.write_bytes(bytes(raw))
    return Scenario(["train", "unet", "--data", root, "--out", env.tmp / "m" / "u.safetensors", "--steps", "2"],
                    (str(f), "CRC"), env.tmp / "m")


def k_text_named_nii_gz(env):
    f = env.tmp / "in" / "notes.nii.gz"
    f.parent.mkdir()
    f.write_bytes(gzip.compress(b"this is a text file, not an image" * 20))
    return Scenario(_segment(env, f), (str(f), "not a NIfTI"), env.tmp / "out")


def k_garbage_nii(env):
    g = env.tmp / "in" / "scan.nii"
    g.parent.mkdir()
    g.write_bytes(b"\x01\x02garbage" * 100)
    return Scenario(_segment(env, g), (str(g), "NIfTI"), env.tmp / "out")


def k_nan_voxels(env):
    image(env.tmp / "in" / "a.nii.gz")
    arr = np.ones((24, 20, 1), np.float32)
    arr[3, 4, 0] = np.nan
    bad = image(env.tmp / "in" / "b.nii.gz", arr)
    return Scenario(_segment(env, env.tmp / "in"), (str(bad), "1 NaN/Inf voxels"), env.tmp / "out")


def k_inf_voxels(env):
    arr = np.random.default_rng(1).random((24, 20, 1)).astype(np.float32)
    arr[5, 5, 0] = -np.inf
    bad = image(env.tmp / "in" / "b.nii.gz", arr)
    return Scenario(_segment(env, bad), (str(bad), "NaN/Inf"), env.tmp / "out")


def k_constant_image(env):
    bad = image(env.tmp / "in" / "flat.nii.gz", np.full((24, 20, 1), 7.0, np.float32))
    return Scenario(_segment(env, bad), (str(bad), "constant"), env.tmp / "out")


def k_rgb_nifti(env):
    rgb = np.zeros((24, 20, 1), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    bad = env.tmp / "in" / "rgb.nii.gz"
    bad.parent.mkdir()
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), bad)
    return Scenario(_segment(env, bad), (str(bad), "RGB"), env.tmp / "out")


def _header_claiming(env, name: str, shape, needle: str, nifti2: bool = False) -> Scenario:
    bad = env.tmp / "in" / name
    bad.parent.mkdir()
    raw = nifti_header_claiming(shape, nifti2)
    bad.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    return Scenario(_segment(env, bad), (str(bad), needle), env.tmp / "out")


def k_header_claims_32767_cubed(env):
    return _header_claiming(env, "huge.nii.gz", (32767, 32767, 32767), "GiB")


def k_header_claims_100000_cubed(env):
    return _header_claiming(env, "huge2.nii", (100000, 100000, 100000), "truncated or corrupt", nifti2=True)


def k_header_claims_30000_squared_tiny_data(env):
    return _header_claiming(env, "flat.nii.gz", (30000, 30000, 1), "truncated or corrupt")


def k_image_label_shape_mismatch(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    lab = root / "labelsTr" / "sub01_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 19, 1), np.uint8), np.diag([1.5, 1.5, 1.0, 1.0])), lab)
    return Scenario(["data", "check", root], (str(lab), "does not match image"))


def k_image_label_affine_mismatch(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    lab = root / "labelsTr" / "sub00_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 1), np.uint8), np.diag([1.0, 1.5, 1.0, 1.0])), lab)
    return Scenario(["data", "check", root], (str(lab), "affine"))


def k_label_value_not_in_dataset_json(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    lab = root / "labelsTr" / "sub00_s0.nii.gz"
    arr = np.zeros((24, 20, 1), np.uint8)
    arr[0, 0] = 7
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 1.0, 1.0])), lab)
    return Scenario(["data", "check", root], (str(lab), "[7]", "not in the dataset's labels"))


def k_label_map_non_integer(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    lab = root / "labelsTr" / "sub00_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 20, 1), 0.5, np.float32), np.diag([1.5, 1.5, 1.0, 1.0])), lab)
    return Scenario(["data", "check", root], (str(lab), "non-integer"))


def k_labels_as_list_in_dataset_json(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = list(meta["labels"])
    (root / "dataset.json").write_text(json.dumps(meta))
    return Scenario(["data", "check", root], (str(root / "dataset.json"), "'labels'"))


def k_dataset_json_invalid(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    (root / "dataset.json").write_text("{not json")
    return Scenario(["data", "check", root], (str(root / "dataset.json"), "invalid JSON"))


def k_missing_channel_in_dataset(env):
    root = write_nnunet(env.tmp / "ds", n=2, channels=2)
    (root / "imagesTr" / "sub01_s0_0001.nii.gz").unlink()
    return Scenario(["data", "check", root], ("sub01_s0_0001.nii.gz", "missing channel"))


def k_missing_channel_in_segment_input(env):
    model = tiny_unet(env.tmp / "u2.safetensors", in_channels=2)
    for case in ("c0", "c1"):
        for ch in range(2):
            image(env.tmp / "in" / f"{case}_{ch:04d}.nii.gz")
    (env.tmp / "in" / "c1_0001.nii.gz").unlink()
    return Scenario(_segment(env, env.tmp / "in", model=model), ("c1_0000.nii.gz", "the model expects 2"),
                    env.tmp / "out")


def k_empty_input_folder(env):
    (env.tmp / "in").mkdir()
    return Scenario(_segment(env, env.tmp / "in"), (str(env.tmp / "in"), "empty"), env.tmp / "out")


def k_missing_dataset_folder(env):
    return Scenario(["data", "check", env.tmp / "nope"], (str(env.tmp / "nope"), "does not exist"))


def k_4d_where_3d_expected(env):
    model = tiny_unet(env.tmp / "u3.safetensors", ndim=3)
    f = image(env.tmp / "cine.nii.gz", np.random.default_rng(0).random((8, 8, 4, 5)).astype(np.float32))
    return Scenario(_segment(env, f, model=model), (str(f), "4D", "expected 3D"), env.tmp / "out")


def k_prediction_grid_mismatch_in_evaluate(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    pred = env.tmp / "pred"
    shutil.copytree(root / "labelsTr", pred)
    bad = pred / "sub01_s0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 1), np.uint8), np.diag([1.5, 1.5, 1.0, 1.0])), bad)
    return Scenario(["evaluate", "--pred", pred, "--gt", root / "labelsTr", "--out", env.tmp / "rep"],
                    (str(bad), "shape"), env.tmp / "rep")


def k_checkpoint_of_another_method(env):
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, "--method", "metaseg"), (str(env.model), "is a 'unet' checkpoint, not 'metaseg'"),
                    env.tmp / "out")


def k_checkpoint_of_newer_format(env):
    ckpt = env.tmp / "future.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt), metadata={"inrseg": json.dumps(
        {"format": "inrseg", "format_version": 99, "method": "unet"})})
    return Scenario(_segment(env, env.tmp, model=ckpt), (str(ckpt), "format 99 is newer"), env.tmp / "out")


def k_checkpoint_zero_bytes(env):
    junk = env.tmp / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    return Scenario(["info", junk], (str(junk), "not an inrseg checkpoint"))


def k_pickle_renamed_as_checkpoint(env):
    ckpt = env.tmp / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, ckpt)  # a zip/pickle file: must never be unpickled
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt), "not an inrseg checkpoint"), env.tmp / "out")


def _damaged_checkpoint(env, name: str, damage: Callable[[bytearray, int], None]) -> Scenario:
    """``env.model`` with its weight bytes changed by ``damage(raw, start_of_data)``."""
    ckpt = env.tmp / name
    raw = bytearray(env.model.read_bytes())
    damage(raw, 8 + int.from_bytes(raw[:8], "little"))  # safetensors: header length, header, data
    ckpt.write_bytes(bytes(raw))
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt), "SHA-256"), env.tmp / "out")


def k_checkpoint_weight_bytes_flipped(env):
    def flip(raw, start):
        for i in range(start + 100, start + 108):
            raw[i] ^= 0xFF
    return _damaged_checkpoint(env, "flipped.safetensors", flip)


def k_checkpoint_weights_zeroed(env):
    def zero(raw, start):
        raw[start + 64:start + 128] = b"\x00" * 64
    return _damaged_checkpoint(env, "zeroed.safetensors", zero)


def k_checkpoint_nan_weights(env):
    with safe_open(str(env.model), framework="pt") as fh:
        meta = json.loads(fh.metadata()["inrseg"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name][0] = float("nan")
    ckpt = save_checkpoint(env.tmp / "nan.safetensors", "unet", tensors,
                           {k: v for k, v in meta.items() if k not in ("format", "format_version", "method",
                                                                       "inrseg_version", "sha256")})
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt), "NaN or Inf"), env.tmp / "out")


def k_header_lies_label_names(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "lie.safetensors", label_names=["bg", "a", "b", "c", "d"])
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt), "does not match its weights"), env.tmp / "out")


def k_header_lies_in_channels(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "lie.safetensors", in_channels=3)
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt), "does not match its weights"), env.tmp / "out")


def k_header_lies_config(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "lie.safetensors", config={"no_such_option": 1})
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt), "does not match its weights"), env.tmp / "out")


def k_header_lies_method(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "lie.safetensors", method="metaseg")
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, model=ckpt), (str(ckpt),), env.tmp / "out")


def k_header_missing_label_names(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "lie.safetensors", label_names=None)
    return Scenario(_segment(env, env.tmp, model=ckpt), (str(ckpt), "label_names"), env.tmp / "out")


def k_output_parent_is_a_file(env):
    root = write_nnunet(env.tmp / "ds", n=4)
    blocker = env.tmp / "results"
    blocker.write_text("a file where a folder should be")
    return Scenario(["train", "unet", "--data", root, "--out", blocker / "u.safetensors", "--steps", "2"],
                    (str(blocker / "u.safetensors"), "not a directory"), blocker.parent / "ds")


def _k_output_not_writable(env):  # run by test_output_folder_not_writable
    root = write_nnunet(env.tmp / "ds", n=4)
    ro = env.tmp / "ro"
    ro.mkdir(mode=0o500)
    return Scenario(["train", "unet", "--data", root, "--out", ro / "u.safetensors", "--steps", "2"],
                    (str(ro / "u.safetensors"), "not writable"), ro)


def k_disk_full_in_evaluate(env):
    root = write_nnunet(env.tmp / "ds", n=2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[0]))

    return Scenario(["evaluate", "--pred", root / "labelsTr", "--gt", root / "labelsTr", "--out", env.tmp / "rep"],
                    ("no space left",), env.tmp / "rep", code=1,
                    patch=lambda mp: mp.setattr("inrseg.core.files.os.replace", full))


def k_disk_full_writing_checkpoint(env):
    root = write_nnunet(env.tmp / "ds", n=4)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[0]))

    return Scenario(["train", "unet", "--data", root, "--out", env.tmp / "m" / "u.safetensors", "--steps", "1"],
                    ("no space left",), None, code=1,
                    patch=lambda mp: mp.setattr("inrseg.core.files.os.replace", full))


def k_scale_too_large_for_memory(env):
    f = image(env.tmp / "in" / "a.nii.gz", np.random.default_rng(0).random((48, 64, 1)).astype(np.float32))
    return Scenario(_segment(env, f, "--scale", "200"), (str(f), "--scale 200", "GiB"), env.tmp / "out",
                    env={"INRSEG_MAX_MEMORY_GB": "2"})


def k_scale_zero(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), "--scale", "0"), ("--scale", "positive"),
                    env.tmp / "out")


def k_scale_negative(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), "--scale", "-2"), ("--scale", "positive"),
                    env.tmp / "out")


def k_scale_nan(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), "--scale", "nan"), ("--scale", "nan"),
                    env.tmp / "out")


def _train_with(env, *extra):
    root = write_nnunet(env.tmp / "ds", n=4)
    return ["train", "unet", "--data", root, "--out", env.tmp / "m" / "u.safetensors", *extra]


def k_steps_zero(env):
    return Scenario(_train_with(env, "--steps", "0"), ("--steps",), env.tmp / "m")


def k_threads_negative(env):
    return Scenario(["--threads", "-1", *_train_with(env)], ("--threads",), env.tmp / "m")


def k_val_fraction_negative(env):
    return Scenario(_train_with(env, "--val-fraction", "-0.5"), ("--val-fraction", "fraction"), env.tmp / "m")


def k_budget_negative(env):
    return Scenario(_train_with(env, "--budget-minutes", "-1"), ("--budget-minutes", "positive"), env.tmp / "m")


def k_budget_nan(env):
    return Scenario(_train_with(env, "--budget-minutes", "nan"), ("--budget-minutes",), env.tmp / "m")


def k_unknown_device(env):
    return Scenario(_train_with(env, "--device", "tpu"), ("--device", "tpu"), env.tmp / "m")


def k_existing_state_without_resume(env):
    args = _train_with(env, "--steps", "2")
    (env.tmp / "m").mkdir()
    state = env.tmp / "m" / "u.safetensors.train-state"
    state.write_bytes(b"state of an interrupted run")
    return Scenario(args, (str(state), "--resume", "--force"), env.tmp / "m")


def k_segment_into_a_filled_folder(env):
    f = image(env.tmp / "in" / "a.nii.gz")
    assert env.cli(*_segment(env, f)).code == 0          # a first run fills OUT
    return Scenario(_segment(env, f), (str(env.tmp / "out"), "not empty", "--force"), env.tmp / "out")


def k_evaluate_into_a_filled_folder(env):
    root = write_nnunet(env.tmp / "ds", n=2)
    (env.tmp / "rep").mkdir()
    (env.tmp / "rep" / "notes.txt").write_text("mine")
    return Scenario(["evaluate", "--pred", root / "labelsTr", "--gt", root / "labelsTr", "--out", env.tmp / "rep"],
                    (str(env.tmp / "rep"), "not empty"), env.tmp / "rep")


def k_unknown_command(env):
    return Scenario(["segmnet"], ("No such command",))


CORPUS = {name[2:]: fn for name, fn in globals().items() if name.startswith("k_")}


def test_corpus_size():
    assert len(CORPUS) >= 30, len(CORPUS)


@pytest.fixture(scope="module")
def model2d(tmp_path_factory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("ckpt") / "unet.safetensors")


def _run_scenario(kind, cli, tmp_path, model2d, monkeypatch):
    sc = kind(Env(tmp_path, model2d, cli))
    for k, v in sc.env.items():
        monkeypatch.setenv(k, v)
    before = snapshot(sc.watch)
    kept = [_snapshot_any(p) for p in sc.keep]
    everything = snapshot(tmp_path)  # a refused command changes no file anywhere: inputs included
    with monkeypatch.context() as mp:
        if sc.patch is not None:
            sc.patch(mp)
        res = cli(*sc.args)
    assert_one_line_error(res, *map(str, sc.needles), code=sc.code)
    assert snapshot(sc.watch) == before, "the output folder changed"
    assert [_snapshot_any(p) for p in sc.keep] == kept, "an input changed"
    assert snapshot(tmp_path) == everything, "a file changed, appeared or went"
    if sc.watch is not None:  # no temporary leftovers next to it either
        assert not [p for p in sc.watch.parent.glob(f".{sc.watch.name}.*")], list(sc.watch.parent.iterdir())


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input(name, cli, tmp_path, model2d, monkeypatch):
    _run_scenario(CORPUS[name], cli, tmp_path, model2d, monkeypatch)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_not_writable(cli, tmp_path, model2d, monkeypatch):
    _run_scenario(_k_output_not_writable, cli, tmp_path, model2d, monkeypatch)


# ============================================================================================
# faults that are not one command
# ============================================================================================

def test_console_entry_point_exit_code_and_debug(tmp_path):
    """The real command (separate process): one line and exit 2; --debug shows the traceback."""
    cmd = [sys.executable, "-m", "inrseg", "data", "check", str(tmp_path / "missing")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    res = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr
    # a file nibabel itself complains about: its own log lines must not surround ours
    bad = tmp_path / "scan.nii"
    bad.write_bytes(b"\x01\x02garbage" * 100)
    tiny_unet(tmp_path / "m.safetensors")
    res = subprocess.run([sys.executable, "-m", "inrseg", "segment", "--model", str(tmp_path / "m.safetensors"),
                          "--input", str(bad), "--output", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr


def test_sigint_saves_the_state_and_resume_continues(tmp_path):
    """Ctrl-C during training: exit 130, a line that says how to resume, the state on disk; a
    plain rerun refuses to overwrite it; --resume continues from the saved step."""
    root = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "m" / "u.safetensors"
    cmd = [sys.executable, "-m", "inrseg", "--threads", "1", "train", "unet", "--data", str(root),
           "--out", str(out), "--steps", "100000"]
    env = dict(os.environ, INRSEG_PROGRESS="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "training unet" not in seen:
        seen += proc.stderr.read(1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = seen + err
    assert proc.returncode == 130, err
    state = out.with_name(out.name + ".train-state")
    assert state.exists() and not out.exists()
    assert "--resume" in err and str(state) in err
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    from inrseg.engine.checkpoints import load_train_state

    saved = load_train_state(state, "unet")["step"]
    assert saved >= 1
    done = subprocess.run(cmd[:-1] + [str(saved + 3), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {saved}" in done.stderr
    assert out.exists() and not state.exists()


def test_stale_temporaries_of_a_killed_write_are_removed_and_named(cli, tmp_path):
    root = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "m" / "u.safetensors"
    out.parent.mkdir()
    stale = out.parent / f".{out.name}.k3j2.tmp.safetensors"   # what a SIGKILL mid-write leaves
    stale.write_bytes(b"")
    res = cli("train", "unet", "--data", root, "--out", out, "--steps", "2")
    assert res.code == 0, res.err
    assert not stale.exists() and f"removed {stale}" in res.err


def test_concurrent_writers_are_refused(tmp_path):
    from inrseg.core.files import atomic_dir, exclusive_lock

    target = tmp_path / "m.safetensors"
    with exclusive_lock(target):
        with pytest.raises(InputError, match="another inrseg process"):
            with exclusive_lock(target):
                pass
    with exclusive_lock(target):  # released: can be taken again
        pass
    # two writers of one output folder: the one that finishes second changes nothing
    out = tmp_path / "out"
    with pytest.raises(InputError, match="another process meanwhile"):
        with atomic_dir(out) as first:
            (first / "a.nii.gz").write_text("first")
            with atomic_dir(out) as second:
                (second / "a.nii.gz").write_text("second")
    assert (out / "a.nii.gz").read_text() == "second"
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    from inrseg.core.files import atomic_dir
    from inrseg.data.nifti import save_labels
    from inrseg.data.volume import Volume
    from inrseg.data.phantoms.datasets import write_phantom_dataset
    from inrseg.viz.figures import save_png

    old = os.umask(mask)
    try:
        ckpt = tiny_unet(tmp_path / "u.safetensors")
        lab = save_labels(np.zeros((4, 5), np.uint8), tmp_path / "l.nii.gz", like=Volume(np.zeros((4, 5)), np.eye(4), 2))
        import matplotlib.pyplot as plt

        fig = plt.figure()
        png = save_png(fig, tmp_path / "f.png")
        with atomic_dir(tmp_path / "rep") as d:
            (d / "x.txt").write_text("x")
        ds = tmp_path / "ph"
        write_phantom_dataset("brain2d", ds, n_train=1, n_test=0, seed=0, shape=(32, 32))
    finally:
        os.umask(old)
    for f in (ckpt, lab, png, next((ds / "imagesTr").iterdir())):
        assert f.stat().st_mode & 0o777 == file_mode, (f, oct(f.stat().st_mode))
    for d in (tmp_path / "rep", ds):
        assert d.stat().st_mode & 0o777 == dir_mode, (d, oct(d.stat().st_mode))


def test_status_lines_without_a_terminal(tmp_path):
    """stderr a pipe (a batch job's log): no progress bar, but a status line at least every
    INRSEG_STATUS_SECONDS, with the bar's count and the budget used."""
    root = write_nnunet(tmp_path / "ds", n=4)
    cmd = [sys.executable, "-m", "inrseg", "--threads", "1", "train", "unet", "--data", str(root),
           "--out", str(tmp_path / "u.safetensors"), "--steps", "150", "--budget-minutes", "5"]
    env = {k: v for k, v in os.environ.items() if k not in ("INRSEG_PROGRESS", "INRSEG_QUIET")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(env, INRSEG_STATUS_SECONDS="0.5"))
    assert res.returncode == 0, res.stderr
    beats = [ln for ln in res.stderr.splitlines() if ln.startswith("[") and " min] " in ln]
    assert len(beats) >= 2, res.stderr
    assert any("training unet:" in ln and "/150" in ln for ln in beats), beats
    assert any("budget" in ln and "of 5.0 min used" in ln for ln in beats), beats
    assert "\r" not in res.stderr  # no bar redraws in a log
