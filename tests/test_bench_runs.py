"""``bench --folds``, ``--jobs``, ``--scheduler local`` (submitit) and what they must not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_brain2d
from inrseg.cli import main
from inrseg.core.errors import InputError
from inrseg.data.cases import Case
from inrseg.data.splits import fold_splits
from inrseg.eval import bench


@settings(max_examples=50, deadline=None)
@given(n_subjects=st.integers(2, 30), per=st.integers(1, 3), k=st.integers(2, 6), seed=st.integers(0, 99))
def test_every_subject_is_held_out_exactly_once(n_subjects, per, k, seed):
    cases = [Case(f"s{i}_{j}", f"s{i}", (Path(f"s{i}_{j}.nii.gz"),)) for i in range(n_subjects) for j in range(per)]
    if n_subjects < k:
        with pytest.raises(InputError, match="only"):
            fold_splits(cases, k, seed)
        return
    folds = fold_splits(cases, k, seed)
    assert len(folds) == k
    held = [c.case_id for _, va in folds for c in va]
    assert sorted(held) == sorted(c.case_id for c in cases)  # every case once
    for tr, va in folds:
        assert va and not {c.subject_id for c in tr} & {c.subject_id for c in va}
        assert len(tr) + len(va) == len(cases)
    sizes = [len({c.subject_id for c in va}) for _, va in folds]
    assert max(sizes) - min(sizes) <= 1
    assert fold_splits(cases, k, seed) == folds  # deterministic


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_brain2d(tmp_path_factory.mktemp("runs") / "ds", n_test=2, shape="32,40")


def _bench(data: Path, out: Path, **kw) -> dict:
    run = bench.run_bench(data, kw.pop("methods", "unet"), None, kw.pop("seeds", [0, 1]), out, device="cpu",
                          allow_dirty=True, threads=1, steps=kw.pop("steps", 3), **kw)
    return json.loads((run / "results.json").read_text()), run


def _scores(res: dict) -> list:
    return sorted((r["method"], str(r["seed"]), c["case"], round(c["mean_foreground_dice"], 12))
                  for r in res["runs"] for c in r["cases"])


@pytest.fixture(scope="module")
def serial(data, tmp_path_factory):
    return _bench(data, tmp_path_factory.mktemp("serial"))


def test_jobs_give_the_results_of_a_serial_run(data, serial, tmp_path):
    """`--jobs 2` (spawned worker processes): the same per-case scores, seed ensemble included,
    to the last bit, and the runs listed in the same order."""
    res, _ = _bench(data, tmp_path / "par", jobs=2)
    assert _scores(res) == _scores(serial[0])
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [(r["method"], r["seed"]) for r in serial[0]["runs"]]
    assert "unet ensemble" in res["methods"]


def test_submitit_local_backend_gives_the_same_results(data, serial, tmp_path):
    pytest.importorskip("submitit")
    res, run = _bench(data, tmp_path / "sub", jobs=2, scheduler="local")
    assert _scores(res) == _scores(serial[0])
    assert (run / "scheduler").is_dir()  # submitit's logs of each job


def test_folds_score_every_training_subject_out_of_fold(data, tmp_path):
    res, run = _bench(data, tmp_path / "cv", seeds=[0], folds=3, methods="unet,segresnet")
    from inrseg.data.layouts import open_dataset
    ds = open_dataset(data)
    assert res["split"]["folds"] == 3 and sorted(sum(res["split"]["fold_subjects"], [])) == sorted(
        {c.subject_id for c in ds.train})
    oof = [r for r in res["runs"] if r["method"] == "unet out-of-fold"]
    assert len(oof) == 1 and sorted(c["case"] for c in oof[0]["cases"]) == sorted(c.case_id for c in ds.train)
    fold_runs = [r for r in res["runs"] if r["method"] == "unet"]
    assert sorted(r["seed"] for r in fold_runs) == ["0.f0", "0.f1", "0.f2"]
    assert all(len(r["cases"]) == len(ds.test) for r in fold_runs)  # the test split, by each fold's model
    w = res["methods"]["segresnet out-of-fold"]["wilcoxon_vs_first"]
    assert w["against"] == "unet out-of-fold" and w["n"] == len(ds.train)  # paired over every training subject
    assert "unet ensemble" in res["methods"]  # the folds' ensemble on test
    assert sorted(p.name for p in (run / "models").iterdir())[:3] == ["segresnet-seed0.f0", "segresnet-seed0.f1",
                                                                      "segresnet-seed0.f2"]


def test_no_keep_keeps_no_models(data, tmp_path):
    _, run = _bench(data, tmp_path / "nk", seeds=[0], keep=False)
    assert not (run / "models").exists()


def test_bench_cli_takes_the_options(data, tmp_path, monkeypatch):
    seen = {}

    def fake(*a, **k):
        seen.update(k)
        raise InputError(None, "stop here")

    monkeypatch.setattr("inrseg.cli.bench_cmds.run_bench", fake)
    if True:
        main(["bench", "--data", str(data), "--methods", "unet", "--folds", "5", "--jobs", "3", "--no-keep",
              "--scheduler", "slurm", "--slurm-partition", "gpu", "--slurm-gpus", "1", "--steps", "7"])
    assert seen["folds"] == 5 and seen["jobs"] == 3 and seen["keep"] is False and seen["scheduler"] == "slurm"
    assert seen["slurm"]["partition"] == "gpu" and seen["slurm"]["gpus_per_node"] == 1 and seen["steps"] == 7
