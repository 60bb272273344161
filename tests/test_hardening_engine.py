"""Hardening of the engine (issue 22): checkpoint integrity over header and weights, training
states validated before they load, a distributed environment that cannot form failing in bounded
time, and a metrics log without holes or duplicates after SIGKILL and --resume.

The kinds are table-driven like tests/test_bad_input.py (one command each: exit code, one
``error:`` line naming the file or variable, inputs and outputs byte for byte as before); the
faults that are not one command (a real SIGKILL, a rendezvous without its second rank) are plain
tests below the table, each in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import CliResult, write_nnunet
from inrseg.cli.train import state_file, train_config
from inrseg.data.layouts import open_dataset
from inrseg.data.nifti import load_labels
from inrseg.engine import LoopSettings, run_training
from inrseg.engine.checkpoints import (FORMAT_VERSION, canonical_json, header_digest, load_checkpoint,
                                       load_train_state, read_metadata, save_checkpoint, save_train_state,
                                       tensors_digest)
from inrseg.methods.registry import load_segmenter
from inrseg.methods.unet import UNetSegmenter
from test_bad_input import Env, Scenario, _run_scenario, assert_one_line_error, image, lying_checkpoint
from test_bad_input import model2d  # noqa: F401  (the fixture)
from test_training import _Regression, _StepBudget

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "equivalence"
#: a tiny network for `train unet` (the state files of the kinds are made with the same config)
TINY = ("--set", "channels=[4,8]", "--set", "num_res_units=0")
STEPS = 4


# ============================================================================================
# helpers
# ============================================================================================

def _segment(env: Env, model: Path) -> Scenario:
    """``segment`` of one image with ``model``, which must be refused naming it."""
    f = image(env.tmp / "in" / "a.nii.gz")
    return Scenario(["segment", "--model", model, "--input", f, "--output", env.tmp / "out"], (str(model),),
                    env.tmp / "out", keep=(model, f))


def _refused(env: Env, model: Path, *needles: str) -> Scenario:
    sc = _segment(env, model)
    sc.needles = sc.needles + needles
    return sc


def _header(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["inrseg"]), {k: f.get_tensor(k) for k in f.keys()}


def _write_raw(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A safetensors file with exactly this header (no digest recomputed)."""
    save_file(tensors, str(path), metadata={"inrseg": json.dumps(meta)})
    return path


def _train_args(env: Env, *extra: str) -> list:
    return ["train", "unet", "--data", env.tmp / "ds", "--out", env.tmp / "m" / "u.safetensors", "--steps",
            str(STEPS), "--device", "cpu", *TINY, *extra]


def _interrupted_state(env: Env, steps_done: int = 1, channels: str = "[4,8]") -> Path:
    """A real training state of `train unet` on ``env.tmp/ds`` after ``steps_done`` steps, where
    the command of :func:`_train_args` keeps it (``OUT.train-state``)."""
    root = write_nnunet(env.tmp / "ds", n=4)
    ds = open_dataset(root)
    cfg = train_config("unet", 2, sets=[f"channels={channels}", "num_res_units=0"], steps=STEPS)
    state = state_file(env.tmp / "m" / "u.safetensors")
    UNetSegmenter(ds.label_names, 2, 1, cfg).fit(ds.train[:3], ds.train[3:], state_path=state,
                                                budget=_StepBudget(steps_done))
    assert load_train_state(state, "unet")["step"] == steps_done
    return state


def _resume_refused(env: Env, state: Path, *needles: str) -> Scenario:
    """``train --resume`` from ``state``: refused naming it, nothing written, the state kept."""
    return Scenario(_train_args(env, "--resume"), (str(state), *needles), env.tmp / "m", keep=(state,))


def _rewritten_state(state: Path, change) -> Path:
    """``state`` re-saved (valid digests) after ``change(dict)`` edited its content."""
    st = load_train_state(state, "unet")
    change(st)
    save_train_state(state, "unet", st)
    return state


def _dist_env(**values: str):
    """A patch that sets exactly these torchrun variables (the others unset)."""
    def patch(mp: pytest.MonkeyPatch) -> None:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "INRSEG_DIST_TIMEOUT"):
            mp.delenv(name, raising=False)
        for name, value in values.items():
            mp.setenv(name, value)
    return patch


def _dist_refused(env: Env, *needles: str, **values: str) -> Scenario:
    write_nnunet(env.tmp / "ds", n=4)
    return Scenario(_train_args(env), needles, env.tmp / "m", patch=_dist_env(**values), keep=(env.tmp / "ds",))


# ============================================================================================
# the corpus: name -> builder(Env) -> Scenario
# ============================================================================================

# --- model checkpoints: a checksum over everything the file says ---------------------------

def k_checkpoint_sha256_deleted(env):
    meta, tensors = _header(env.model)
    meta.pop("sha256")
    return _refused(env, _write_raw(env.tmp / "nosum.safetensors", meta, tensors), "without a checksum")


def k_checkpoint_format1_without_sha256(env):
    meta, tensors = _header(env.model)
    for key in ("sha256", "tensors_sha256"):
        meta.pop(key)
    meta["format_version"] = 1
    return _refused(env, _write_raw(env.tmp / "old.safetensors", meta, tensors), "without a checksum")


def k_checkpoint_normalization_edited(env):
    meta, _ = _header(env.model)
    ckpt = lying_checkpoint(env.model, env.tmp / "e.safetensors", config={**meta["config"], "normalization": "minmax"})
    return _refused(env, ckpt, "header does not match", "SHA-256")


def k_checkpoint_label_order_edited(env):
    meta, _ = _header(env.model)
    ckpt = lying_checkpoint(env.model, env.tmp / "e.safetensors", label_names=meta["label_names"][::-1])
    return _refused(env, ckpt, "header does not match", "SHA-256")


def k_checkpoint_format_version_edited(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "e.safetensors", format_version=1)
    return _refused(env, ckpt, "header does not match")


def k_checkpoint_format_version_zero(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "e.safetensors", format_version=0)
    return _refused(env, ckpt, "format_version 0")


def k_checkpoint_config_edited(env):
    meta, _ = _header(env.model)
    ckpt = lying_checkpoint(env.model, env.tmp / "e.safetensors", config={**meta["config"], "seed": 7})
    return _refused(env, ckpt, "header does not match")


def k_checkpoint_history_edited(env):
    ckpt = lying_checkpoint(env.model, env.tmp / "e.safetensors", best_step=1)
    return _refused(env, ckpt, "header does not match")


def k_checkpoint_tensor_edited(env):
    meta, tensors = _header(env.model)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5  # a well-formed file, one weight changed, the header as it was
    return _refused(env, _write_raw(env.tmp / "w.safetensors", meta, tensors), "weights", "SHA-256")


def k_checkpoint_json_nested_too_deeply(env):
    _, tensors = _header(env.model)
    ckpt = env.tmp / "deep.safetensors"
    save_file(tensors, str(ckpt), metadata={"inrseg": "[" * 200_000 + "]" * 200_000})
    return _refused(env, ckpt, "nested too deeply")


# --- training states: validated before anything loads --------------------------------------

def k_state_step_beyond_the_run(env):
    state = _rewritten_state(_interrupted_state(env), lambda st: st.update(step=10 ** 9))
    return _resume_refused(env, state, "step 1000000000", f"{STEPS} steps")


def k_state_negative_step(env):
    state = _rewritten_state(_interrupted_state(env), lambda st: st.update(step=-1))
    return _resume_refused(env, state, "step -1")


def k_state_of_another_network(env):
    return _resume_refused(env, _interrupted_state(env, channels="[4,8,16]"), "another network")


def k_state_missing_tensor(env):
    state = _interrupted_state(env)
    meta, tensors = _header(state)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_checkpoint(state, "unet", tensors, {"kind": "train-state", "state": meta["state"]})  # valid digests
    return _resume_refused(env, state, repr(dropped), "does not hold")


def k_state_weight_missing(env):
    state = _rewritten_state(_interrupted_state(env), lambda st: st["weights"].popitem())
    return _resume_refused(env, state, "another network", "lack '__schedule_steps__'")


def k_state_unreferenced_tensor(env):
    state = _interrupted_state(env)
    meta, tensors = _header(state)
    save_checkpoint(state, "unet", {**tensors, "stray": torch.zeros(2)}, {"kind": "train-state",
                                                                           "state": meta["state"]})
    return _resume_refused(env, state, "'stray'", "no part")


def k_state_step_not_an_integer(env):
    state = _rewritten_state(_interrupted_state(env), lambda st: st.update(step="five"))
    return _resume_refused(env, state, "'step'", "expected int")


def k_state_key_missing(env):
    state = _rewritten_state(_interrupted_state(env), lambda st: st.pop("optimizers"))
    return _resume_refused(env, state, "not a valid training state", "missing ['optimizers']")


def k_state_optimizer_count(env):
    state = _rewritten_state(_interrupted_state(env), lambda st: st["optimizers"].append({}))
    return _resume_refused(env, state, "2 optimizers", "this run has 1")


def k_state_header_edited(env):
    state = _interrupted_state(env)
    meta, _ = _header(state)
    edited = json.loads(json.dumps(meta["state"]).replace('["step", 1]', '["step", 2]'))
    assert edited != meta["state"]
    lying_checkpoint(state, state, state=edited)
    return _resume_refused(env, state, "header does not match")


def k_state_without_sha256(env):
    state = _interrupted_state(env)
    meta, tensors = _header(state)
    meta.pop("sha256")
    _write_raw(state, meta, tensors)
    return _resume_refused(env, state, "without a checksum")


# --- a torchrun environment that cannot form --------------------------------------------------

def k_world_size_not_a_number(env):
    return _dist_refused(env, "WORLD_SIZE='abc'", "whole number", WORLD_SIZE="abc")


def k_world_size_zero(env):
    return _dist_refused(env, "WORLD_SIZE=0", WORLD_SIZE="0")


def k_rank_out_of_range(env):
    return _dist_refused(env, "RANK=2", "0..1", WORLD_SIZE="2", RANK="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="29500")


def k_rank_garbage(env):
    return _dist_refused(env, "RANK='one'", WORLD_SIZE="2", RANK="one", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def k_leftover_rank_without_world_size(env):
    return _dist_refused(env, "RANK=3", "WORLD_SIZE=1", RANK="3")


def k_local_rank_garbage(env):
    return _dist_refused(env, "LOCAL_RANK='x'", WORLD_SIZE="2", RANK="0", LOCAL_RANK="x", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="29500")


def k_missing_rank(env):
    return _dist_refused(env, "WORLD_SIZE=2", "RANK is not set", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="29500")


def k_missing_master_addr(env):
    return _dist_refused(env, "MASTER_ADDR is not set", WORLD_SIZE="2", RANK="0", MASTER_PORT="29500")


def k_missing_master_port(env):
    return _dist_refused(env, "MASTER_PORT is not set", WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1")


def k_master_port_out_of_range(env):
    return _dist_refused(env, "MASTER_PORT=70000", WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="70000")


def k_dist_timeout_garbage(env):
    return _dist_refused(env, "INRSEG_DIST_TIMEOUT='abc'", WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="29500", INRSEG_DIST_TIMEOUT="abc")


def k_world_size_garbage_in_segment(env):
    sc = _segment(env, env.model)
    sc.needles, sc.patch = ("WORLD_SIZE='2x'",), _dist_env(WORLD_SIZE="2x")
    return sc


CORPUS = {name[2:]: fn for name, fn in globals().items() if name.startswith("k_")}


def test_corpus_size():
    assert len(CORPUS) >= 30, len(CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_engine_bad_input(name, cli, tmp_path, model2d, monkeypatch):
    _run_scenario(CORPUS[name], cli, tmp_path, model2d, monkeypatch)


# ============================================================================================
# checkpoints: what must keep working
# ============================================================================================

def test_header_digest_is_over_the_canonical_json(tmp_path, model2d):
    """Spacing and key order are not edits: a header re-serialised another way still loads;
    the digest is over the canonical JSON of the header without ``sha256``."""
    meta, tensors = _header(model2d)
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["tensors_sha256"] == tensors_digest(tensors) and meta["sha256"] == header_digest(meta)
    assert canonical_json({"b": [1, 2.5], "a": None}) == b'{"a":null,"b":[1,2.5]}'
    reordered = tmp_path / "r.safetensors"
    save_file(tensors, str(reordered), metadata={"inrseg": json.dumps(dict(reversed(list(meta.items()))), indent=3)})
    assert load_segmenter(reordered).label_names == meta["label_names"]


def test_format1_checkpoint_loads_with_a_hint_and_resaves_as_format2(tmp_path, cli):
    """A format-1 checkpoint (made before the header digest) loads with a one-line hint; re-saved
    as the hint says, it is format 2 with the same weights and no hint."""
    old = shutil.copy(FIXTURES / "unet-2d.safetensors", tmp_path / "old.safetensors")
    assert read_metadata(old)["format_version"] == 1
    f = image(tmp_path / "in" / "a.nii.gz", np.random.default_rng(1).random((24, 24, 1)).astype(np.float32))
    res = cli("segment", "--model", old, "--input", f, "--output", tmp_path / "o1")
    assert res.code == 0, res.err
    hints = [ln for ln in res.err.splitlines() if "format-1 checkpoint" in ln]
    assert len(hints) == 1 and str(old) in hints[0] and "save" in hints[0] and "format 2" in hints[0], res.err
    new = tmp_path / "new.safetensors"
    load_segmenter(old).save(new)
    assert read_metadata(new)["format_version"] == 2
    a, b = load_checkpoint(old)[0], load_checkpoint(new)[0]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    res = cli("segment", "--model", new, "--input", f, "--output", tmp_path / "o2")
    assert res.code == 0 and "format-1" not in res.err, res.err
    assert np.array_equal(load_labels(tmp_path / "o1" / "a.nii.gz").data, load_labels(tmp_path / "o2" / "a.nii.gz").data)


def test_state_at_the_last_step_resumes_to_its_weights(tmp_path):
    """A state saved at the run's last step (killed before the model was written) is accepted:
    the run ends at once with the state's weights, not untrained ones."""
    task = _Regression()
    state = tmp_path / "s"
    run_training(task, LoopSettings(steps=5, val_every=5, state_path=state))
    trained = float(task.w.detach())
    again = _Regression()
    res = run_training(again, LoopSettings(steps=5, val_every=5, state_path=state))
    assert res.start_step == res.last_step == 5 and float(again.w.detach()) == trained != 0.0


# ============================================================================================
# the metrics log after kills
# ============================================================================================

def _log_steps(log: Path) -> list[int]:
    """The steps of the log's lines, up to a half-written last line (a kill's)."""
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            break
    return steps


def test_log_lines_after_the_state_are_cut_on_resume(tmp_path):
    """Lines a killed run wrote after its last state (and a half-written one) are removed when
    the run resumes, so that the log holds each step once."""
    log, state = tmp_path / "m.jsonl", tmp_path / "s"
    task = _Regression()
    run_training(task, LoopSettings(steps=10, val_every=3, state_path=state, log_path=log, budget=_StepBudget(5)))
    assert load_train_state(state, "toy")["step"] == 5 and _log_steps(log) == [1, 2, 3, 4, 5]
    with log.open("a") as f:  # what a run killed after step 7 left
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + json.dumps({"step": 7, "loss": 1.0}) + "\n{\"ste")
    run_training(_Regression(), LoopSettings(steps=10, val_every=3, state_path=state, log_path=log))
    assert _log_steps(log) == list(range(1, 11))


def test_sigkill_then_resume_leaves_no_hole_in_the_log(tmp_path):
    """A real SIGKILL of `train` after it has written training states: the log holds every step
    the state covers (flushed before each state), and the resumed run's log is 1..N, no hole, no
    duplicate."""
    root = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "m" / "u.safetensors"
    state, log = state_file(out), out.with_name(out.name + ".metrics.jsonl")
    base = [sys.executable, "-m", "inrseg", "--threads", "1", "train", "unet", "--data", str(root), "--out",
            str(out), "--device", "cpu", *TINY, "--val-every", "3"]
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen(base + ["--steps", "100000"], stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and not state.exists() and proc.poll() is None:
                time.sleep(0.05)
            assert state.exists(), (tmp_path / "err.txt").read_text()
            time.sleep(1.0)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    saved = load_train_state(state, "unet")["step"]
    before = _log_steps(log)
    assert saved >= 3 and before[:saved] == list(range(1, saved + 1)), (saved, before[-5:])
    done = subprocess.run(base + ["--steps", str(saved + 5), "--resume"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {saved}" in done.stderr
    assert _log_steps(log) == list(range(1, saved + 6))
    assert out.exists() and not state.exists()


# ============================================================================================
# a rendezvous that cannot form: bounded, one line
# ============================================================================================

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1])
def test_rendezvous_without_the_other_rank_fails_in_bounded_time(tmp_path, rank):
    """WORLD_SIZE=2 with a master address and no other rank (rank 0 waits for a client that never
    comes; rank 1 for a master that is not there): one line within INRSEG_DIST_TIMEOUT, exit 2,
    no output."""
    root = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "m" / "u.safetensors"
    env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), INRSEG_DIST_TIMEOUT="3")
    cmd = [sys.executable, "-m", "inrseg", "--threads", "1", "train", "unet", "--data", str(root), "--out", str(out),
           "--steps", "1", "--device", "cpu", *TINY]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert time.perf_counter() - t0 < 60
    assert_one_line_error(CliResult(res.returncode, res.stdout, res.stderr), "WORLD_SIZE=2", "INRSEG_DIST_TIMEOUT",
                          "127.0.0.1")
    assert "c10d" not in res.stderr and "frame #" not in res.stderr, res.stderr  # torch's retry logs held back
    if rank == 1:  # no status lines on rank 1: the error is all there is
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.parent.exists()
