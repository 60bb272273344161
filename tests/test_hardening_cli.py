"""The command line's part of the hardening corpus: no output ever replaces an input, every OS
error and every writer's error is one line, every option and environment variable is
range-checked, a killed ``segment``'s leftovers are removed and named, text is UTF-8 whatever
the locale.

Three tables, each kind asserting the exit code, the one ``error:`` line with its needles, no
traceback, the watched output unchanged (or still absent, with no temporaries beside it) and
every ``keep`` input byte for byte as before:

* ``CORPUS``: in-process commands (:func:`test_bad_input._run_scenario`);
* ``SUBPROCESS_CORPUS``: real ``python -m inrseg`` processes under a file-size limit
  (``RLIMIT_FSIZE``, what ``ulimit -f`` sets): the OS's own ``EFBIG``;
* ``TMPFS_CORPUS``: commands writing to a small tmpfs (a real full disk); skipped where
  ``mount`` is not permitted.

Positive checks (a legal 240-character name, leftovers, the locale) follow the tables.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_nnunet
from test_bad_input import (Env, Scenario, _run_scenario, _snapshot_any, assert_one_line_error, image, snapshot,
                            tiny_unet)
from inrseg.core.files import (NAME_MAX, atomic_path, claim_output, exclusive_lock, refuse_overlap,
                               stale_temporaries, temp_prefix)
from inrseg.core.errors import InputError

AFFINE = np.diag([1.5, 1.5, 1.0, 1.0])


# ============================================================================================
# builders
# ============================================================================================

def _segment(env: Env, inp: Path, out: Path | None = None, *extra, model: Path | None = None) -> list:
    return ["segment", "--model", model or env.model, "--input", inp, "--output", out or env.tmp / "out", *extra]


def _train(env: Env, out: Path, *extra, data: Path | None = None) -> list:
    data = data or write_nnunet(env.tmp / "ds", n=4)
    return ["train", "unet", "--data", data, "--out", out, "--steps", "1", *extra]


def _evaluate(pred: Path, gt: Path, out: Path, *extra) -> list:
    return ["evaluate", "--pred", pred, "--gt", gt, "--out", out, *extra]


def _nisf(env: Env, ndim: int = 2) -> Path:
    """A tiny untrained NISF checkpoint (held-out slices and planes are its capabilities)."""
    from inrseg.methods.nisf import NISF, NISFConfig

    path = env.tmp / f"nisf{ndim}d.safetensors"
    NISF(["background", "a", "b"], ndim, 1, NISFConfig(width=16, depth=2)).save(path)
    return path


def _with_test_split(root: Path) -> Path:
    """``write_nnunet``'s dataset with its last case moved to imagesTs / labelsTs (bench needs
    labelled test cases)."""
    for kind, suffix in (("images", "_0000.nii.gz"), ("labels", ".nii.gz")):
        (root / f"{kind}Ts").mkdir()
        last = sorted((root / f"{kind}Tr").glob(f"*{suffix}"))[-1]
        last.rename(root / f"{kind}Ts" / last.name)
    return root


def _ukbb_gt(root: Path, subjects=("s01", "s02")) -> Path:
    """UK Biobank-style ground truth: ``<subject>/seg_sa.nii.gz`` (and ``sa.nii.gz``)."""
    rng = np.random.default_rng(0)
    for s in subjects:
        (root / s).mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.integers(0, 3, (12, 10, 2)).astype(np.uint8), AFFINE), root / s / "seg_sa.nii.gz")
        nib.save(nib.Nifti1Image(rng.random((12, 10, 2)).astype(np.float32), AFFINE), root / s / "sa.nii.gz")
    return root


# ============================================================================================
# 1. no output ever is, or holds, an input (whatever --force says)
# ============================================================================================

def k_segment_force_output_is_the_input_folder(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Scenario(_segment(env, d / "imagesTr", d / "imagesTr", "--force"),
                    (str(d / "imagesTr"), "--output is the input --input", "whatever --force"), d, keep=(d,))


def k_segment_force_output_is_the_dataset_holding_the_input(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Scenario(_segment(env, d / "imagesTr", d, "--force"), (str(d), "holds the input --input"), d, keep=(d,))


def k_segment_force_output_is_a_symlink_to_the_input(env):
    d = write_nnunet(env.tmp / "D", n=2)
    link = env.tmp / "link"
    link.symlink_to(d / "imagesTr", target_is_directory=True)
    return Scenario(_segment(env, d / "imagesTr", link, "--force"), (str(link), "is the input --input"), d,
                    keep=(d,))


def k_segment_force_output_holds_the_model(env):
    models = env.tmp / "models"
    model = tiny_unet(models / "u.safetensors")
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f, models, "--force", model=model), (str(models), "holds the input --model"),
                    models, keep=(models,))


def k_segment_force_output_is_a_subject_of_the_input(env):
    """``--input C`` of UK Biobank subject folders, ``--output C/s01``: a subject's own folder."""
    c = _ukbb_gt(env.tmp / "C")
    return Scenario(_segment(env, c, c / "s01", "--force"), (str(c / "s01"), "holds the input --input", "sa.nii.gz"),
                    c, keep=(c,))


def k_evaluate_force_out_is_the_predictions(env):
    d = write_nnunet(env.tmp / "D", n=2)
    pred = env.tmp / "P"
    shutil.copytree(d / "labelsTr", pred)
    return Scenario(_evaluate(pred, d / "labelsTr", pred, "--force"), (str(pred), "--out is the input --pred"),
                    pred, keep=(pred, d))


def k_evaluate_force_out_holds_the_ground_truth(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Scenario(_evaluate(d / "labelsTr", d / "labelsTr", d, "--force"), (str(d), "holds the input"), d,
                    keep=(d,))


def k_evaluate_force_out_is_the_images_beside_the_gt(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Scenario(_evaluate(d / "labelsTr", d / "labelsTr", d / "imagesTr", "--force", "--html"),
                    (str(d / "imagesTr"), "the images beside --gt"), d, keep=(d,))


def k_evaluate_force_out_is_a_subject_of_the_gt(env):
    c = _ukbb_gt(env.tmp / "C")
    pred = env.tmp / "P"
    pred.mkdir()
    for s in ("s01", "s02"):
        shutil.copy(c / s / "seg_sa.nii.gz", pred / f"{s}.nii.gz")
    return Scenario(_evaluate(pred, c, c / "s01", "--force"), (str(c / "s01"), "holds the input --gt", "seg_sa"),
                    c, keep=(c, pred))


def k_evaluate_force_out_holds_the_labels_json(env):
    d = write_nnunet(env.tmp / "D", n=2)
    meta = env.tmp / "meta"
    meta.mkdir()
    shutil.copy(d / "dataset.json", meta / "dataset.json")
    return Scenario(_evaluate(d / "labelsTr", d / "labelsTr", meta, "--force", "--labels", meta / "dataset.json"),
                    (str(meta), "holds the input --labels"), meta, keep=(meta, d))


def k_phantom_force_over_a_real_dataset(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Scenario(["data", "phantom", "--kind", "brain2d", "--n", "1", "--out", d, "--force"],
                    (str(d), "did not write", "--force replaces only"), d, keep=(d,))


def k_phantom_force_over_a_folder_of_other_files(env):
    home = env.tmp / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("years of work")
    return Scenario(["data", "phantom", "--kind", "brain2d", "--n", "1", "--out", home, "--force"],
                    (str(home), "did not write"), home, keep=(home,))


def k_phantom_over_a_file_even_with_force(env):
    f = env.tmp / "notes.txt"
    f.write_text("mine")
    return Scenario(["data", "phantom", "--kind", "brain2d", "--n", "1", "--out", f, "--force"],
                    (str(f), "not a directory"), keep=(f,))


def k_bench_out_is_the_data(env):
    d = _with_test_split(write_nnunet(env.tmp / "D", n=4))
    return Scenario(["bench", "--data", d, "--methods", "unet", "--out", d, "--allow-dirty"],
                    (str(d), "--out is the input --data"), d, keep=(d,))


def k_figures_out_is_the_data(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Scenario(["figures", "--model", env.model, "--data", d, "--out", d], (str(d), "--out is the input --data"),
                    d, keep=(d,))


def k_train_force_out_is_the_config(env):
    cfg = env.tmp / "unet.toml"
    cfg.write_text("steps = 1\n")
    return Scenario(_train(env, cfg, "--config", cfg, "--force"), (str(cfg), "--out is the input --config"),
                    keep=(cfg,))


def k_train_force_out_is_the_splits_file(env):
    d = write_nnunet(env.tmp / "D", n=4)
    splits = env.tmp / "splits.json"
    splits.write_text(json.dumps({"val": ["sub03"]}))
    return Scenario(_train(env, splits, "--splits", splits, "--force", data=d), (str(splits), "--splits"),
                    keep=(splits, d))


def k_train_force_out_is_a_dataset_file(env):
    d = write_nnunet(env.tmp / "D", n=4)
    f = d / "imagesTr" / "sub00_s0_0000.nii.gz"
    return Scenario(_train(env, f, "--force", data=d), (str(f), "not an inrseg checkpoint", "even with --force"),
                    d, keep=(d,))


def k_train_out_replaces_a_checkpoint_without_force(env):
    ckpt = tiny_unet(env.tmp / "m" / "u.safetensors")
    return Scenario(_train(env, ckpt), (str(ckpt), "exists", "--force"), ckpt.parent, keep=(ckpt,))


def k_train_force_out_is_a_notes_file(env):
    notes = env.tmp / "m" / "notes.json"
    notes.parent.mkdir()
    notes.write_text('{"my": "notes"}')
    return Scenario(_train(env, notes, "--force"), (str(notes), "not an inrseg checkpoint", "even with --force"),
                    notes.parent, keep=(notes,))


def k_train_out_is_a_notes_file_without_force(env):
    """No hint to use --force: --force would not replace it either."""
    notes = env.tmp / "m" / "notes.json"
    notes.parent.mkdir()
    notes.write_text('{"my": "notes"}')
    return Scenario(_train(env, notes), (str(notes), "not an inrseg checkpoint"), notes.parent, keep=(notes,))


def k_train_force_out_is_a_training_state(env):
    from inrseg.engine.checkpoints import save_train_state

    state = save_train_state(env.tmp / "m" / "old.train-state", "unet", {"step": 1})
    return Scenario(_train(env, state, "--force"), (str(state), "training-state file", "even with --force"),
                    state.parent, keep=(state,))


def k_train_out_is_an_existing_folder(env):
    folder = env.tmp / "models"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("mine")
    return Scenario(_train(env, folder), (str(folder), "is a directory", "checkpoint file"), folder, keep=(folder,))


def k_demo_out_holds_other_files(env):
    home = env.tmp / "work"
    home.mkdir()
    (home / "paper.md").write_text("draft")
    return Scenario(["demo", "--out", home], (str(home), "inrseg demo did not write"), home, keep=(home,))


# ============================================================================================
# 2. OS errors (real ones): one line naming the file, exit 2 where the user's name is at fault
# ============================================================================================

def k_output_name_of_300_characters(env):
    out = env.tmp / ("o" * 300)
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), out), (str(out), "255"))


def k_input_name_of_300_characters(env):
    """``stat`` itself fails with ENAMETOOLONG (not a missing file)."""
    inp = env.tmp / ("i" * 300 + ".nii.gz")
    return Scenario(_segment(env, inp), (str(inp), "file name too long"), env.tmp / "out")


def k_train_out_name_too_long_for_its_state_file(env):
    out = env.tmp / ("u" * 240 + ".safetensors")  # 252 bytes: legal, but OUT.train-state would be 264
    return Scenario(_train(env, out), (f"{out}.train-state", "255"), keep=())


def k_output_under_proc(env):
    out = Path("/proc/inrseg-no-such-folder")
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), out), (str(out),))


def k_train_out_under_proc(env):
    out = Path("/proc/inrseg-no-such-folder/u.safetensors")
    return Scenario(_train(env, out), ("/proc/inrseg-no-such-folder",))


def k_evaluate_out_under_proc(env):
    d = write_nnunet(env.tmp / "D", n=2)
    out = Path("/proc/inrseg-no-such-folder")
    return Scenario(_evaluate(d / "labelsTr", d / "labelsTr", out), (str(out),), keep=(d,))


def k_bench_out_below_a_file(env):
    """``mkdir`` below a regular file: the OS's own ENOTDIR, before any training."""
    d = _with_test_split(write_nnunet(env.tmp / "D", n=4))
    blocker = env.tmp / "runs"
    blocker.write_text("a file where a folder should be")
    return Scenario(["bench", "--data", d, "--methods", "unet", "--out", blocker / "b", "--allow-dirty"],
                    (str(blocker / "b"), "not a directory"), keep=(blocker, d))


def k_segment_output_below_a_file(env):
    blocker = env.tmp / "results"
    blocker.write_text("a file")
    out = blocker / "pred"
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), out), (str(out), "not a directory"),
                    keep=(blocker,))


def k_train_metrics_log_path_is_a_folder(env):
    """The OS's own EISDIR (unlinking a folder where the run's metrics log goes), before training."""
    out = env.tmp / "m" / "u.safetensors"
    log = out.with_name(out.name + ".metrics.jsonl")
    (log / "x").mkdir(parents=True)
    return Scenario(_train(env, out), (str(log), "is a directory"), env.tmp / "m")


def k_evaluate_labels_json_is_a_folder(env):
    d = write_nnunet(env.tmp / "D", n=2)
    (env.tmp / "dataset.json").mkdir()
    return Scenario(_evaluate(d / "labelsTr", d / "labelsTr", env.tmp / "rep", "--labels", env.tmp / "dataset.json"),
                    (str(env.tmp / "dataset.json"), "is a directory"), env.tmp / "rep", keep=(d,))


# ============================================================================================
# 6. options and environment variables, range-checked
# ============================================================================================

def k_train_seed_negative(env):
    return Scenario(_train(env, env.tmp / "m" / "u.safetensors", "--seed", "-1"), ("--seed",), env.tmp / "m")


def k_train_seed_2_to_the_70(env):
    return Scenario(_train(env, env.tmp / "m" / "u.safetensors", "--seed", str(2**70)), ("--seed", "4294967295"),
                    env.tmp / "m")


def k_phantom_seed_negative(env):
    return Scenario(["data", "phantom", "--kind", "brain2d", "--seed", "-1", "--out", env.tmp / "ph"], ("--seed",),
                    env.tmp / "ph")


def k_bench_split_seed_2_to_the_32(env):
    return Scenario(["bench", "--data", env.tmp, "--methods", "unet", "--split-seed", str(2**32), "--out",
                     env.tmp / "runs"], ("--split-seed",), env.tmp / "runs")


def k_bench_seeds_2_to_the_70(env):
    return Scenario(["bench", "--data", env.tmp, "--methods", "unet", "--seeds", str(2**70), "--out",
                     env.tmp / "runs"], ("--seeds",), env.tmp / "runs")


def k_bench_threads_a_million(env):
    return Scenario(["bench", "--data", env.tmp, "--methods", "unet", "--threads", "1000000", "--out",
                     env.tmp / "runs"], ("--threads",), env.tmp / "runs")


def k_global_threads_a_million(env):
    return Scenario(["--threads", "1000000", *_train(env, env.tmp / "m" / "u.safetensors")], ("--threads",),
                    env.tmp / "m")


def k_budget_minutes_1e308(env):
    return Scenario(_train(env, env.tmp / "m" / "u.safetensors", "--budget-minutes", "1e308"),
                    ("--budget-minutes", "at most"), env.tmp / "m")


def k_batch_size_2_to_the_70(env):
    return Scenario(_train(env, env.tmp / "m" / "u.safetensors", "--batch-size", str(2**70)), ("--batch-size",),
                    env.tmp / "m")


def k_patch_edge_a_million(env):
    return Scenario(_train(env, env.tmp / "m" / "u.safetensors", "--patch", "1000000"), ("--patch",), env.tmp / "m")


def k_scale_1e308(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), None, "--scale", "1e308"),
                    ("--scale", "at most"), env.tmp / "out")


def k_scale_inf(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), None, "--scale", "inf"), ("--scale",),
                    env.tmp / "out")


def k_plane_mm_1e308(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), None, "--plane", "lax", "--plane-mm", "1e308"),
                    ("--plane-mm",), env.tmp / "out")


def k_phantom_n_2_to_the_70(env):
    return Scenario(["data", "phantom", "--kind", "brain2d", "--n", str(2**70), "--out", env.tmp / "ph"], ("--n",),
                    env.tmp / "ph")


def k_phantom_shape_axis_a_million(env):
    return Scenario(["data", "phantom", "--kind", "brain2d", "--shape", "1000000,32", "--out", env.tmp / "ph"],
                    ("--shape", "at most"), env.tmp / "ph")


def _heldout(env, spec: str, *needles: str) -> Scenario:
    f = image(env.tmp / "in" / "a.nii.gz")  # 24 x 20 (2D)
    return Scenario(_segment(env, f, None, "--heldout", spec, model=_nisf(env)), ("--heldout", *needles),
                    env.tmp / "out", keep=(f,))


def k_heldout_axis_9_of_a_2d_image(env):
    return _heldout(env, "9:1,2", "axis 9", str(env.tmp / "in" / "a.nii.gz"))


def k_heldout_slice_999(env):
    return _heldout(env, "0:999", "[999]", "[0, 23]")


def k_heldout_slice_minus_1(env):
    return _heldout(env, "0:-1", "count from 0")


def k_heldout_every_slice(env):
    return _heldout(env, "1:" + ",".join(map(str, range(20))), "every slice")


def k_heldout_no_slice(env):
    return _heldout(env, "1:", "at least one slice")


def k_heldout_not_numbers(env):
    return _heldout(env, "z:1", "AXIS:i,j")


def k_plane_lax_on_a_2d_model(env):
    model = _nisf(env)
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), None, "--plane", "lax", model=model),
                    (str(model), "--plane", "2D"), env.tmp / "out")


def k_plane_with_parallel_directions(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), None, "--plane", "0,0,0;1,0,0;2,0,0"),
                    ("--plane", "not parallel"), env.tmp / "out")


def k_plane_size_of_one_axis(env):
    return Scenario(_segment(env, image(env.tmp / "in" / "a.nii.gz"), None, "--plane", "lax", "--plane-size", "64"),
                    ("--plane-size", "two pixel counts"), env.tmp / "out")


def _env_var(env, name: str, value: str) -> Scenario:
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(_segment(env, f), (f"error: environment variable {name}",), env.tmp / "out", env={name: value},
                    keep=(f,))


def k_status_seconds_abc(env):
    return _env_var(env, "INRSEG_STATUS_SECONDS", "abc")


def k_status_seconds_nan(env):
    return _env_var(env, "INRSEG_STATUS_SECONDS", "nan")


def k_status_seconds_negative(env):
    return _env_var(env, "INRSEG_STATUS_SECONDS", "-5")


def k_max_memory_gb_abc_not_blamed_on_the_image(env):
    return _env_var(env, "INRSEG_MAX_MEMORY_GB", "abc")


def k_max_memory_gb_zero(env):
    return _env_var(env, "INRSEG_MAX_MEMORY_GB", "0")


def k_quiet_abc(env):
    return _env_var(env, "INRSEG_QUIET", "abc")


def k_progress_maybe(env):
    return _env_var(env, "INRSEG_PROGRESS", "maybe")


def k_plane_frame_past_the_last(env):
    """A 3D+t image of 3 frames, ``--frame 5``: refused before the test-time fit."""
    f = image(env.tmp / "in" / "cine.nii.gz", np.random.default_rng(0).random((8, 8, 4, 3)).astype(np.float32))
    return Scenario(_segment(env, f, None, "--plane", "lax", "--frame", "5", model=_nisf(env, 4)),
                    (str(f), "--frame 5", "3 frames"), env.tmp / "out", keep=(f,))


CORPUS = {name[2:]: fn for name, fn in globals().items() if name.startswith("k_")}


@pytest.fixture(scope="module")
def model2d(tmp_path_factory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("ckpt") / "unet.safetensors")


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hardening(name, cli, tmp_path, model2d, monkeypatch):
    _run_scenario(CORPUS[name], cli, tmp_path, model2d, monkeypatch)


# ============================================================================================
# real processes under a file-size limit (ulimit -f): the OS's own EFBIG
# ============================================================================================

@dataclass
class Process:
    """A command run as ``python -m inrseg`` with ``RLIMIT_FSIZE`` = ``max_file_bytes``."""

    args: list
    needles: tuple[str, ...]
    watch: Path | None = None
    code: int = 1
    keep: tuple[Path, ...] = ()
    max_file_bytes: int = 20000
    env: dict[str, str] = field(default_factory=dict)


def p_efbig_writing_the_training_state(env):
    """safetensors' own error (its Rust writer): named, exit 1, the run's folder and log removed."""
    d = write_nnunet(env.tmp / "ds", n=4)
    out = env.tmp / "run" / "u.safetensors"
    return Process(["train", "unet", "--data", d, "--out", out, "--steps", "1", "--set", "channels=[4, 8]",
                    "--set", "num_res_units=0"], ("u.safetensors", "file too large"), env.tmp / "run", keep=(d,),
                   max_file_bytes=4096)


def p_efbig_writing_a_phantom_image(env):
    """nibabel / gzip writing: named, exit 1, nothing of the dataset left."""
    return Process(["data", "phantom", "--kind", "brain2d", "--n", "2", "--out", env.tmp / "ph"],
                   (str(env.tmp / "ph"), "file too large"), env.tmp / "ph")


def p_efbig_writing_the_evaluation_csv(env):
    d = write_nnunet(env.tmp / "D", n=2)
    return Process(_evaluate(d / "labelsTr", d / "labelsTr", env.tmp / "rep"),
                   (str(env.tmp / "rep" / "per_case.csv"), "file too large"), env.tmp / "rep", keep=(d,),
                   max_file_bytes=64)


SUBPROCESS_CORPUS = {name[2:]: fn for name, fn in globals().items() if name.startswith("p_")}


@dataclass
class _Res:
    code: int
    err: str


def _run_process(sc: Process, cwd: Path) -> None:
    before, kept = snapshot(sc.watch), [_snapshot_any(p) for p in sc.keep]
    limit = sc.max_file_bytes

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k not in ("INRSEG_PROGRESS",)}
    res = subprocess.run([sys.executable, "-m", "inrseg", *map(str, sc.args)], capture_output=True, text=True,
                         timeout=300, preexec_fn=limited, cwd=cwd, env={**env, **sc.env})
    assert_one_line_error(_Res(res.returncode, res.stderr), *sc.needles, code=sc.code)
    assert snapshot(sc.watch) == before, "the output changed"
    assert [_snapshot_any(p) for p in sc.keep] == kept, "an input changed"
    if sc.watch is not None:
        assert not list(sc.watch.parent.glob(f".{sc.watch.name}.*")), list(sc.watch.parent.iterdir())


@pytest.mark.parametrize("name", sorted(SUBPROCESS_CORPUS))
def test_hardening_in_a_process(name, tmp_path, model2d):
    _run_process(SUBPROCESS_CORPUS[name](Env(tmp_path, model2d, None)), tmp_path)


# ============================================================================================
# a real full disk: a small tmpfs
# ============================================================================================

def t_disk_full_writing_the_training_state(env, disk: Path):
    d = write_nnunet(env.tmp / "ds", n=4)
    out = disk / "run" / "u.safetensors"
    return Scenario(["train", "unet", "--data", d, "--out", out, "--steps", "1"], ("u.safetensors", "no space left"),
                    disk / "run", code=1, keep=(d,))


def t_disk_full_writing_the_label_maps(env, disk: Path):
    f = image(env.tmp / "in" / "a.nii.gz", np.random.default_rng(0).random((96, 96, 1)).astype(np.float32))
    return Scenario(_segment(env, f, disk / "out", "--save-probabilities"), (str(disk / "out"), "no space left"),
                    disk / "out", code=1, keep=(f,))


TMPFS_CORPUS = {name[2:]: fn for name, fn in globals().items() if name.startswith("t_")}


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs at ``tmp_path / "disk"`` (skipped where ``mount`` is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("name", sorted(TMPFS_CORPUS))
def test_hardening_on_a_full_disk(name, cli, tmp_path, model2d, monkeypatch, small_disk):
    _run_scenario(lambda env: TMPFS_CORPUS[name](env, small_disk), cli, tmp_path, model2d, monkeypatch)


def test_corpus_size():
    assert len(CORPUS) + len(SUBPROCESS_CORPUS) + len(TMPFS_CORPUS) >= 40


# ============================================================================================
# good input that used to fail, and leftovers
# ============================================================================================

def test_a_legal_240_character_name_gets_temporaries_within_255_bytes(cli, tmp_path, model2d):
    """A 240-character input name: segment writes OUT/<233 characters>.nii.gz through temporaries
    whose names stay within 255 bytes, and train writes a 240-character checkpoint name (with its
    state and log beside it)."""
    stem = "c" * 233
    f = image(tmp_path / "in" / f"{stem}.nii.gz")
    res = cli("segment", "--model", model2d, "--input", f, "--output", tmp_path / "out")
    assert res.code == 0, res.err
    assert (tmp_path / "out" / f"{stem}.nii.gz").exists()
    for name in (f"{stem}.nii.gz", "é" * 120, "x" * 255):  # characters, bytes, the limit itself
        tmp = tmp_path / "t" / name
        with atomic_path(tmp) as p:
            assert len(os.fsencode(p.name)) <= NAME_MAX
            p.write_bytes(b"1")
            assert stale_temporaries(tmp) == [p]  # a killed writer's file is found by its prefix
        assert tmp.read_bytes() == b"1"
    out = tmp_path / "m" / ("u" * 228 + ".safetensors")
    res = cli("train", "unet", "--data", write_nnunet(tmp_path / "ds", n=4), "--out", out, "--steps", "1")
    assert res.code == 0, res.err
    assert out.exists() and len(out.name) == 240


def test_train_force_replaces_an_earlier_checkpoint(cli, tmp_path):
    """--force replaces a checkpoint (and only a checkpoint: see the corpus)."""
    out = tiny_unet(tmp_path / "u.safetensors")
    before = out.read_bytes()
    res = cli("train", "unet", "--data", write_nnunet(tmp_path / "ds", n=4), "--out", out, "--steps", "1", "--force")
    assert res.code == 0, res.err
    assert out.read_bytes() != before


def test_an_output_inside_an_input_folder_is_allowed(cli, tmp_path, model2d):
    """Nothing of the input is replaced, and no reader looks into it: D/pred beside D's images."""
    d = write_nnunet(tmp_path / "D", n=2)
    before = snapshot(d / "imagesTr")
    res = cli("segment", "--model", model2d, "--input", d / "imagesTr", "--output", d / "imagesTr" / "pred")
    assert res.code == 0, res.err
    assert {k: v for k, v in snapshot(d / "imagesTr").items() if not k.startswith("pred")} == before
    assert len(list((d / "imagesTr" / "pred").glob("*.nii.gz"))) == 2


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_what_a_killed_writer_left_is_removed_and_named(command, cli, tmp_path, model2d):
    """A killed segment / evaluate leaves its hidden temporary folder (and, killed while replacing,
    the old one): the next run to the same output removes both and names them."""
    d = write_nnunet(tmp_path / "D", n=2)
    out = tmp_path / "out"
    stale = [tmp_path / ".out.k3j2ab9x.tmp", tmp_path / ".out.q8r7zz01.old.tmp"]
    for s in stale:
        (s / "x").mkdir(parents=True)
        (s / "x" / "half.nii.gz").write_bytes(b"half-written")
    unrelated = tmp_path / ".out.keep"  # no temporary of ours: stays
    unrelated.write_text("mine")
    args = (["segment", "--model", model2d, "--input", d / "imagesTr", "--output", out] if command == "segment"
            else ["evaluate", "--pred", d / "labelsTr", "--gt", d / "labelsTr", "--out", out])
    res = cli(*args)
    assert res.code == 0, res.err
    for s in stale:
        assert not s.exists() and f"removed {s}: a temporary folder" in res.err
    assert unrelated.read_text() == "mine" and out.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p != unrelated]


def test_a_live_writer_keeps_its_temporaries(cli, tmp_path, model2d):
    """Another process holding the output's lock: refused at once, its temporaries untouched."""
    f = image(tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    live = tmp_path / ".out.abcd1234.tmp"
    live.mkdir()
    with exclusive_lock(out):
        res = cli("segment", "--model", model2d, "--input", f, "--output", out)
    assert_one_line_error(res, str(out), "another inrseg process")
    assert live.is_dir() and not out.exists()


def test_claim_output_removes_the_folders_a_failed_command_created(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(OSError):
        with claim_output(target):
            assert (tmp_path / "a" / "b").is_dir()
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "a").exists()


def test_refuse_overlap_by_inode_and_symlink(tmp_path):
    """Bind mounts and hard links are the same file to the check: compared by inode."""
    src = tmp_path / "in.txt"
    src.write_text("x")
    os.link(src, tmp_path / "hard.txt")
    with pytest.raises(InputError, match="is the input --input"):
        refuse_overlap({"--output": tmp_path / "hard.txt"}, {"--input": src})
    (tmp_path / "sym").symlink_to(tmp_path)
    with pytest.raises(InputError, match="holds the input --input"):
        refuse_overlap({"--output": tmp_path / "sym"}, {"--input": src})
    refuse_overlap({"--output": tmp_path / "elsewhere"}, {"--input": src, "--model": None})
    assert temp_prefix("a") == ".a."


# ============================================================================================
# 9. UTF-8 whatever the locale
# ============================================================================================

def _c_locale() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LANGUAGE") and
           not k.startswith("LC_")}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0"}


def test_non_ascii_case_ids_and_labels_under_the_c_locale(tmp_path):
    """``LC_ALL=C`` without Python's UTF-8 mode: non-ASCII case ids (file names) and label names
    (dataset.json) are written to per_case.csv and summary.json as UTF-8; the table prints."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    rng = np.random.default_rng(0)
    ids = ["café_ü", "Øresund-β"]
    for cid in ids:
        lab = rng.integers(0, 3, (12, 10, 1)).astype(np.uint8)
        for d in (pred, gt):
            nib.save(nib.Nifti1Image(lab, AFFINE), d / f"{cid}.nii.gz")
    names = {"Hintergrund": 0, "Flüssigkeit": 1, "Weiße Substanz": 2}
    (gt / "dataset.json").write_text(json.dumps({"name": "Gehirn-ü", "labels": names}, ensure_ascii=False),
                                     encoding="utf-8")
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "inrseg", "evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out),
           "--no-distances", "--html"]
    res = subprocess.run(cmd, capture_output=True, timeout=300, env=_c_locale())
    assert res.returncode == 0, res.stderr.decode("utf-8", "replace")
    rows = list(csv.DictReader(open(out / "per_case.csv", encoding="utf-8")))
    assert [r["case"] for r in rows] == sorted(ids)
    assert "dice_Flüssigkeit" in rows[0]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["per_class"]) == set(names)
    assert "Flüssigkeit" in (out / "report.html").read_text(encoding="utf-8")
    assert b"Fl\\xfcssigkeit" in res.stdout  # the printed table, escaped for an ASCII terminal
    ds = write_nnunet(tmp_path / "ds", n=2, labels={"Hintergrund": 0, "Flüssigkeit": 1, "Weiß": 2})
    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    (ds / "dataset.json").write_text(json.dumps({**meta, "name": "Gehirn-ü"}, ensure_ascii=False), encoding="utf-8")
    check = subprocess.run([sys.executable, "-m", "inrseg", "data", "check", str(ds)], capture_output=True,
                           timeout=300, env=_c_locale())
    assert check.returncode == 0, check.stderr.decode("utf-8", "replace")
    info = json.loads(check.stdout)
    assert info["name"] == "Gehirn-ü" and info["labels"] == ["Hintergrund", "Flüssigkeit", "Weiß"]
