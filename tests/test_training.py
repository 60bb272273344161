"""The training engine: budget, validation / best state, resume, metrics log, devices."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from conftest import write_blobs
from inrseg.data.layouts import open_dataset
from inrseg.core.errors import InputError
from inrseg.methods.unet import UNetConfig, UNetSegmenter
from inrseg.engine import (Budget, LoopSettings, TrainTask, resolve_device, run_training, step_rng,
                             use_bf16)

CPU = torch.device("cpu")


class _Regression(TrainTask):
    """w -> 3 by SGD on (w - 3)^2; ``validate`` replays ``scores`` one per validation."""

    def __init__(self, scores: list[float] | None = None, sleep: float = 0.0) -> None:
        self.w = torch.zeros(1, device=CPU, requires_grad=True)
        super().__init__(name="toy", method="toy", optimizers=[torch.optim.SGD([self.w], lr=0.1)], params=[self.w],
                         grad_sync="none", validates=scores is not None)
        self.replay, self.sleep = list(scores or []), sleep

    def step(self, i: int):
        time.sleep(self.sleep)
        return ((self.w - 3.0) ** 2).sum(), {"w": float(self.w.detach())}

    def validate(self):
        return {"val_dice": self.replay.pop(0), "w": float(self.w.detach())}

    def weights(self):
        return {"w": self.w}

    def load_weights(self, d):
        with torch.no_grad():
            self.w.copy_(d["w"])


def _regression_task(scores: list[float] | None = None, sleep: float = 0.0):
    task = _Regression(scores, sleep)
    return task.w, task.optimizers[0], task


def test_one_step_runs_alone():
    """A hook can be called without the loop: one step's loss and parts."""
    task = _Regression()
    loss, parts = task.step(0)
    assert float(loss.detach()) == pytest.approx(9.0) and parts == {"w": 0.0}


def test_best_on_validation_is_restored_and_history_kept():
    w, _, task = _regression_task(scores=[0.1, 0.9, 0.5, 0.2])
    res = run_training(task, LoopSettings(steps=8, val_every=2))
    assert [h["step"] for h in res.history] == [2, 4, 6, 8]
    assert res.best_step == 4 and res.best_score == 0.9
    assert float(w.detach()) == pytest.approx(res.history[1]["w"])   # step 4's weights, not step 8's
    assert float(w.detach()) != pytest.approx(res.history[-1]["w"])


def test_without_validation_the_last_weights_are_kept():
    w, _, task = _regression_task()
    res = run_training(task, LoopSettings(steps=20, val_every=5))
    assert res.last_step == 20 and float(w.detach()) == pytest.approx(3.0, abs=0.1)


def test_budget_stops_training_and_counts_from_its_start():
    _, _, task = _regression_task(sleep=0.05)
    started_earlier = Budget(0.01, start=time.perf_counter() - 0.5)   # 0.6 s, 0.5 s already spent
    t0 = time.perf_counter()
    res = run_training(task, LoopSettings(steps=1000, val_every=1000, budget=started_earlier))
    assert res.stopped_by_budget and 1 <= res.last_step < 10
    assert time.perf_counter() - t0 < 0.6
    assert res.history and res.history[-1]["step"] == res.last_step   # validated at the stop


def test_budget_share_and_validation():
    b = Budget(1.0)
    part = b.share(0.5)
    assert 29 < part.remaining_s() <= 30.01 and part.remaining_s() < b.remaining_s()
    assert not Budget(None).limited and not Budget(None).share(0.5).limited
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InputError):
            Budget(bad)


def test_metrics_log_has_one_line_per_step(tmp_path):
    _, _, task = _regression_task(scores=[0.5, 0.6])
    log = tmp_path / "m.jsonl"
    run_training(task, LoopSettings(steps=6, val_every=3, log_path=log))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "time_s", "w"} <= set(e) for e in lines)
    assert [e.get("val_dice") for e in lines] == [None, None, 0.5, None, None, 0.6]
    assert lines[0]["loss"] == pytest.approx(9.0)


def test_step_rng_is_a_pure_function():
    a = step_rng(1, 5, 2).integers(1 << 30, size=4)
    assert np.array_equal(a, step_rng(1, 5, 2).integers(1 << 30, size=4))
    assert not np.array_equal(a, step_rng(1, 5, 3).integers(1 << 30, size=4))
    assert not np.array_equal(a, step_rng(1, 6, 2).integers(1 << 30, size=4))


def test_resumed_unet_equals_uninterrupted(tmp_path):
    """Stop after 4 of 8 steps, resume from the state file: bit-for-bit the weights, optimiser
    moments and history of an uninterrupted 8-step run (per-step draws are pure functions of
    (seed, step, item), so nothing random needs saving)."""
    from inrseg.engine.checkpoints import load_train_state

    ds = open_dataset(write_blobs(tmp_path / "ds", n=4, shape=(24, 24)))
    cfg = UNetConfig(channels=(4, 8, 16), num_res_units=1, batch_size=2, val_every=4, lr=3e-3,
                           warmup=2, steps=8)
    full_state, state = tmp_path / "full.train-state", tmp_path / "m.train-state"
    UNetSegmenter(ds.label_names, 2, 1, cfg).fit(ds.train[:3], ds.train[3:], state_path=full_state)
    first = UNetSegmenter(ds.label_names, 2, 1, cfg)
    first.fit(ds.train[:3], ds.train[3:], state_path=state, budget=_StepBudget(4))
    assert [h["step"] for h in first.history] == [4]
    second = UNetSegmenter(ds.label_names, 2, 1, cfg)
    second.fit(ds.train[:3], ds.train[3:], state_path=state)
    assert [h["step"] for h in second.history] == [4, 8]
    a, b = load_train_state(full_state, "unet"), load_train_state(state, "unet")
    for k, v in a["weights"].items():
        assert torch.equal(v, b["weights"][k]), k
    moments = a["optimizers"][0]["state"]
    for i, st in moments.items():
        assert torch.equal(st["exp_avg"], b["optimizers"][0]["state"][i]["exp_avg"])
    assert [h["val_dice"] for h in a["history"]] == [h["val_dice"] for h in b["history"]]


class _StepBudget(Budget):
    """A budget that expires after a given number of steps (the engine asks once per step)."""

    def __init__(self, steps: int) -> None:
        super().__init__(None)
        self.calls, self.steps = 0, steps

    def expired(self) -> bool:
        self.calls += 1
        return self.calls >= self.steps


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device())
                                      if torch.cuda.is_available() else CPU)
    with pytest.raises(InputError, match="expected auto, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda:1")
    assert use_bf16(CPU, "auto") is False and use_bf16(CPU, "bf16") is True
    assert use_bf16(CPU, "fp32") is False


def test_cli_bad_device_is_one_line(cli, tmp_path):
    data = write_blobs(tmp_path / "ds", n=3, shape=(16, 16))
    r = cli("train", "unet", "--data", data, "--out", tmp_path / "m.safetensors", "--steps", "1",
            "--device", "tpu")
    assert r.code == 2 and r.err.strip().startswith("error: --device 'tpu'") and "Traceback" not in r.err
    assert not (tmp_path / "m.safetensors").exists()
