"""``inrseg bench``, ``evaluate --html`` and the self-contained report."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import write_brain2d
from scipy.stats import wilcoxon as scipy_wilcoxon

import inrseg.eval.bench as bench
from inrseg.core.errors import InputError
from inrseg.eval.stats import wilcoxon
from inrseg.methods.registry import ENTRIES, parse_methods, resolve, segmenter_class
from inrseg.cli import main
from inrseg.data.nifti import load_labels, save_labels
from inrseg.data.volume import Volume

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


class _Page(HTMLParser):
    """Collects what a browser would load: tags, image sources, external references, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.h3: list[str] = []
        self._in_h3 = False
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        self._in_h3 = tag == "h3"
        if tag not in ("img", "input", "meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        self._in_h3 = False

    def handle_data(self, data):
        if self._in_h3:
            self.h3.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    assert page.open == [], f"unclosed tags {page.open}"
    return page


def _git_repo(root: Path, dirty: bool) -> Path:
    root.mkdir(parents=True)
    run = lambda *a: subprocess.run(["git", *a], cwd=root, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (root / "code.py").write_text("x = 1\n")
    run("add", "code.py")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    if dirty:
        (root / "code.py").write_text("x = 2\n")
    return root


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_brain2d(tmp_path_factory.mktemp("bench") / "ds")


@pytest.fixture(scope="module")
def tiny_run(phantom, tmp_path_factory) -> Path:
    """2 methods (a CNN and an INR method) x 2 seeds, from a clean checkout."""
    mp = pytest.MonkeyPatch()
    repo = _git_repo(tmp_path_factory.mktemp("repo") / "clean", dirty=False)
    mp.setattr(bench, "source_repo", lambda: repo)
    out = tmp_path_factory.mktemp("runs")
    try:
        assert main(["-q", "bench", "--data", str(phantom), "--methods", "unet,nisf:nisf-cpu-small",
                     "--budget-minutes", "0.06", "--seeds", "2", "--out", str(out), "--threads", "1",
                     "--no-ensemble"]) == 0  # the seed ensemble's row: tests/test_ensemble.py
    finally:
        mp.undo()
    (run,) = out.iterdir()
    return run


@needs_git
def test_bench_keeps_each_runs_model_and_test_predictions(tiny_run, phantom):
    """models/<method>-seed<k>/: the checkpoint loads and predicts the kept labels; the kept
    labels, scored again, are the CSV's per-case Dice."""
    from inrseg.data.layouts import open_dataset
    from inrseg.data.nifti import load_labels
    from inrseg.methods.registry import load_segmenter
    from inrseg.metrics import score_case

    ds = open_dataset(phantom)
    rows = list(csv.DictReader(open(tiny_run / "results.csv")))
    kept = sorted(p.name for p in (tiny_run / "models").iterdir())
    assert kept == ["nisf-nisf-cpu-small-seed0", "nisf-nisf-cpu-small-seed1", "unet-seed0", "unet-seed1"]
    for case in ds.test:
        pred = load_labels(tiny_run / "models" / "unet-seed1" / "predictions" / f"{case.case_id}.nii.gz")
        image, labels = case.load()
        assert np.allclose(pred.affine, image.affine)
        dice = score_case(pred.data, labels.data, ds.num_classes, labels.spacing).mean_foreground_dice
        row = next(r for r in rows if r["method"] == "unet" and r["seed"] == "1" and r["case"] == case.case_id)
        assert dice == pytest.approx(float(row["mean_foreground_dice"]), abs=1e-6)
    model = load_segmenter(tiny_run / "models" / "unet-seed1" / "model.safetensors")
    image, _ = ds.test[0].load()
    from inrseg.data.postprocess import apply_postprocessing
    again = apply_postprocessing(model.predict(image).data, model.postprocessing)
    first = load_labels(tiny_run / "models" / "unet-seed1" / "predictions" / f"{ds.test[0].case_id}.nii.gz")
    assert np.array_equal(again, first.data)


@needs_git
def test_bench_writes_results_and_report(tiny_run):
    assert not tiny_run.name.endswith(".partial")
    assert {p.name for p in tiny_run.iterdir()} == {"results.json", "results.csv", "results.md", "report.html", "logs",
                                                    "models"}
    res = json.loads((tiny_run / "results.json").read_text())
    p = res["provenance"]
    assert p["dirty"] is False and len(p["commit"]) == 40 and p["seeds"] == [0, 1]
    assert {"torch", "monai", "numpy", "inrseg"} <= set(p["libraries"]) and p["threads"] == 1
    assert "--methods unet,nisf:nisf-cpu-small" in p["command"]
    assert list(res["methods"]) == ["unet", "nisf:nisf-cpu-small"]
    # every figure is recomputed here from the per-case rows of the CSV
    rows = list(csv.DictReader(open(tiny_run / "results.csv")))
    assert len(rows) == 2 * 2 * res["split"]["test"]
    for m, a in res["methods"].items():
        per_seed = [statistics.fmean(float(r["mean_foreground_dice"]) for r in rows
                                     if r["method"] == m and int(r["seed"]) == s) for s in (0, 1)]
        mean, sd = a["summary"]["mean_foreground_dice"]
        assert mean == pytest.approx(np.mean(per_seed), abs=1e-5)
        assert sd == pytest.approx(np.std(per_seed, ddof=1), abs=1e-5)
        for cid, d in a["per_case_mean_foreground_dice"].items():
            assert d == pytest.approx(np.mean([float(r["mean_foreground_dice"]) for r in rows
                                               if r["method"] == m and r["case"] == cid]), abs=1e-5)
    w = res["methods"]["nisf:nisf-cpu-small"]["wilcoxon_vs_first"]
    ids = sorted(res["methods"]["unet"]["per_case_mean_foreground_dice"])
    a = [res["methods"]["nisf:nisf-cpu-small"]["per_case_mean_foreground_dice"][i] for i in ids]
    b = [res["methods"]["unet"]["per_case_mean_foreground_dice"][i] for i in ids]
    if any(x != y for x, y in zip(a, b)):
        assert w["p"] == pytest.approx(scipy_wilcoxon(a, b).pvalue)
    assert w["against"] == "unet" and w["n"] == len(ids)
    # NISF chose its inference steps on validation and has a steps curve; logs exist per run
    assert all(r["steps_curve"] for r in res["runs"] if r["method"].startswith("nisf"))
    assert len(list((tiny_run / "logs").glob("*.metrics.jsonl"))) == 4
    md = (tiny_run / "results.md").read_text()
    assert "| unet |" in md and f"{res['methods']['unet']['summary']['mean_foreground_dice'][0]:.3f} ±" in md


@needs_git
def test_report_is_self_contained_html_with_one_gallery_per_method(tiny_run):
    page = _parse(tiny_run / "report.html")
    assert page.external == []                           # nothing fetched: images inlined
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.h3 == ["unet", "nisf:nisf-cpu-small"]     # one gallery per method
    text = (tiny_run / "report.html").read_text()
    gallery = text.split("Best, median and worst test case")[1]
    for m in ("unet", "nisf:nisf-cpu-small"):
        section = gallery.split(f"<h3>{m}</h3>")[1].split("<h3>")[0].split("<h2>")[0]
        assert section.count("<img") == 3                 # best, median, worst (3 test cases)
    for heading in ("Results", "Per-class Dice", "Dice against test-time steps", "Training curves", "Provenance"):
        assert f"<h2>{heading}" in text


@needs_git
def test_a_dirty_tree_is_refused_without_allow_dirty(phantom, tmp_path, monkeypatch, capsys):
    repo = _git_repo(tmp_path / "dirty", dirty=True)
    monkeypatch.setattr(bench, "source_repo", lambda: repo)
    out = tmp_path / "runs"
    args = ["-q", "bench", "--data", str(phantom), "--methods", "unet", "--budget-minutes", "0.02", "--seeds", "1",
            "--out", str(out), "--threads", "1", "--no-html"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uncommitted changes (code.py)" in err[0] and "--allow-dirty" in err[0]
    assert not out.exists()                              # nothing written
    assert main(args + ["--allow-dirty"]) == 0
    res = json.loads(next(out.iterdir()).joinpath("results.json").read_text())
    assert res["provenance"]["dirty"] is True and res["provenance"]["changed"] == ["code.py"]


def test_a_second_run_never_overwrites_the_first(tmp_path, monkeypatch):
    import datetime as dt

    # runs started in the same second
    monkeypatch.setattr(bench, "utc_now", lambda: dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    final1, partial1 = bench.new_run_dir(tmp_path, "ds")
    (partial1 / "results.json").write_text("first")
    partial1.rename(final1)
    final2, partial2 = bench.new_run_dir(tmp_path, "ds")
    final3, partial3 = bench.new_run_dir(tmp_path, "ds")  # one still running (partial) is skipped too
    assert len({final1, final2, final3}) == 3 and final1.name == "20260102-030405-ds"
    assert (final1 / "results.json").read_text() == "first"
    assert partial2.is_dir() and partial3.is_dir()


def test_bench_refuses_torchrun(phantom, tmp_path, monkeypatch, capsys):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29511"}.items():  # a whole torchrun environment
        monkeypatch.setenv(k, v)
    assert main(["-q", "bench", "--data", str(phantom), "--methods", "unet", "--out", str(tmp_path / "r")]) == 2
    assert "without torchrun" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_methods_refuse_data_they_cannot_segment_before_training(tmp_path, capsys):
    """A 3D+t cine: the U-Net is refused up front (bench and train), naming the data; NISF is not."""
    from inrseg.methods.base import check_spatial_ndim

    assert {m: segmenter_class(m).spatial_ndims for m in ENTRIES} == {
        "unet": (2, 3), "segresnet": (2, 3), "morse": (2, 3), "nisf": (2, 3, 4), "metaseg": (2, 3), "nnunet": (2, 3)}
    cine = tmp_path / "cine"
    assert main(["-q", "data", "phantom", "--kind", "cardiac", "--n", "2", "--n-test", "1", "--shape", "16,16,4",
                 "--frames", "2", "--layout", "ukbb", "--out", str(cine)]) == 0
    capsys.readouterr()
    out = tmp_path / "runs"
    assert main(["-q", "bench", "--data", str(cine), "--methods", "nisf,unet", "--out", str(out),
                 "--allow-dirty"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {cine}: 3D+t data: unet segments 2D or 3D images "
                                               "(nisf segments 3D+t cines)")
    assert not out.exists()
    assert main(["-q", "train", "morse", "--data", str(cine), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "3D+t data: morse segments 2D or 3D images" in capsys.readouterr().err
    check_spatial_ndim(segmenter_class("nisf"), 4)


def test_parse_methods_refuses_unknown_names():
    specs = parse_methods("unet, morse:pointrend:unetr ,metaseg:2d-seg24")
    assert [(s.method, s.parts) for s in specs] == [
        ("unet", ()), ("morse", ("pointrend", "unetr")), ("metaseg", ("2d-seg24",))]
    for bad, msg in [("unet,foo", "method 'foo' is not available"), ("nisf:x", "unknown nisf preset"),
                     ("unet,unet", "twice"), ("", "no method"), ("unet:unet-small:x", "too many")]:
        with pytest.raises(InputError, match=msg):
            parse_methods(bad)
    for bad, msg in [("morse:nope", "unknown variant"), ("morse:morse:vnet", "unknown backbone")]:
        with pytest.raises(InputError, match=msg):
            resolve(parse_methods(bad)[0], 2)


def test_wilcoxon_matches_scipy_and_is_nan_where_undefined():
    rng = np.random.default_rng(0)
    a, b = rng.random(12), rng.random(12)
    w = wilcoxon(a, b)
    assert w["p"] == pytest.approx(scipy_wilcoxon(a, b).pvalue) and w["n"] == 12
    assert w["median_difference"] == pytest.approx(np.median(a - b))
    assert math.isnan(wilcoxon(a, a)["p"]) and math.isnan(wilcoxon([0.5], [0.4])["p"])
    assert wilcoxon([0.5, math.nan, 0.2], [0.1, 0.3, 0.4])["n"] == 2


def test_3d_case_panel_is_a_slider_over_the_labelled_slices():
    from inrseg.viz.html_report import MAX_SLIDER_SLICES, case_panel

    gt = np.zeros((8, 8, 30), np.uint8)
    gt[2:6, 2:6, 5:25] = 1
    image = Volume(np.random.default_rng(0).random((1, 8, 8, 30), dtype=np.float32), np.eye(4), 3)
    panel = case_panel(image, gt, gt, ["background", "organ"], "case")
    frames = json.loads(panel.split('<script type="application/json">')[1].split("</script>")[0])
    assert len(frames) == MAX_SLIDER_SLICES
    idx = [int(f["label"].split()[1]) for f in frames]   # "slice K (0-29)"
    assert idx[0] == 5 and idx[-1] == 24 and idx == sorted(idx)   # only slices holding labels
    assert 'type="range"' in panel and f'max="{MAX_SLIDER_SLICES - 1}"' in panel
    # 3D + t: the first frame holding labels is shown (frame 0 is unannotated here)
    cine = np.full((8, 8, 30, 3), 255, np.uint8)
    cine[..., 1] = gt
    image4 = Volume(np.zeros((1, 8, 8, 30, 3), np.float32), np.eye(4), 4)
    panel4 = case_panel(image4, np.zeros_like(cine), cine, ["background", "organ"], "cine", ignore_label=255)
    frames4 = json.loads(panel4.split('<script type="application/json">')[1].split("</script>")[0])
    assert len(frames4) == MAX_SLIDER_SLICES and frames4[0]["label"].startswith("frame 1, slice 5 ")


def test_evaluate_html_report(phantom, tmp_path):
    gt_dir = phantom / "labelsTs"
    pred = tmp_path / "pred"
    for i, f in enumerate(sorted(gt_dir.glob("*.nii.gz"))):
        lab = load_labels(f)
        data = lab.data.copy()
        data[: data.shape[0] * (i + 1) // 5] = 0   # each case worse than the one before
        save_labels(data, pred / f.name, like=lab)
    out = tmp_path / "report"
    assert main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt_dir), "--out", str(out), "--html"]) == 0
    page = _parse(out / "report.html")
    assert page.external == [] and len(page.images) == 1 + 3   # bars + best / median / worst
    text = (out / "report.html").read_text()
    assert "no image found" not in text                        # imagesTs beside labelsTs was used
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['mean_foreground_dice']:.3f}" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) not installed")
def test_slider_moves_in_headless_chromium(tmp_path):
    """The 3D slider's script runs in a real browser: moving the range input swaps the image."""
    from inrseg.viz.html_report import case_panel, page

    gt = np.zeros((8, 8, 20), np.uint8)
    gt[2:6, 2:6, 3:17] = 1
    image = Volume(np.random.default_rng(0).random((1, 8, 8, 20), dtype=np.float32), np.eye(4), 3)
    (tmp_path / "report.html").write_text(page("t", [("case", case_panel(image, gt, gt, ["bg", "organ"], "c"))]))
    (tmp_path / "harness.html").write_text("""<!DOCTYPE html><html><body><div id="out">pending</div>
<iframe id="f" src="report.html"></iframe><script>
document.getElementById('f').addEventListener('load', function(){
  var box = this.contentDocument.querySelector('.slider'), input = box.querySelector('input');
  var before = box.querySelector('img').src;
  input.value = 0; input.dispatchEvent(new Event('input'));
  document.getElementById('out').textContent = (box.querySelector('img').src !== before) + '|' +
      box.querySelector('output').textContent;
});</script></body></html>""")
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
                          "--virtual-time-budget=5000", "--dump-dom", str(tmp_path / "harness.html")],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'id="out">true|slice 3 (0-19)<' in dom, dom[-500:]


def test_bench_tta_rows_are_scored_and_timed_apart(phantom, tmp_path, monkeypatch):
    """`bench --tta`: one '<method> +tta' row per method, scored on TTA predictions (the mean of
    the members' probabilities), with its own per-case times; `--max-test-cases` limits the cases."""
    from inrseg.methods.tta import tta_probabilities
    from inrseg.metrics import summarize

    repo = _git_repo(tmp_path / "clean", dirty=False)
    monkeypatch.setattr(bench, "source_repo", lambda: repo)
    kept = {}
    real_run_one = bench.run_one

    def spy(*args, **kwargs):
        out = real_run_one(*args, **kwargs)
        kept[out.result.method] = out.model
        return out

    monkeypatch.setattr(bench, "run_one", spy)
    out = tmp_path / "runs"
    assert main(["-q", "bench", "--data", str(phantom), "--methods", "unet,nisf:nisf-cpu-small",
                 "--budget-minutes", "0.05", "--seeds", "1", "--out", str(out), "--threads", "1",
                 "--tta", "--max-test-cases", "2", "--no-html"]) == 0
    (run,) = out.iterdir()
    res = json.loads((run / "results.json").read_text())
    assert list(res["methods"]) == ["unet", "nisf:nisf-cpu-small", "unet +tta", "nisf:nisf-cpu-small +tta"]
    assert res["split"]["test"] == 2
    runs = {r["method"]: r for r in res["runs"]}
    assert runs["unet +tta"]["chosen"]["tta members"] == 4 and runs["nisf:nisf-cpu-small +tta"]["chosen"]["tta members"] == 4
    assert len(runs["unet +tta"]["infer_s"]) == 2
    # the +tta row's Dice is the Dice of the TTA labels, recomputed here from the same model
    from inrseg.data.layouts import open_dataset
    from inrseg.data.postprocess import apply_postprocessing
    from inrseg.metrics import score_case

    ds = open_dataset(phantom)
    model = kept["unet"]
    metrics = []
    for case in ds.test[:2]:
        image, labels = case.load()
        pred = apply_postprocessing(tta_probabilities(model, image)[0].data.argmax(0), model.postprocessing)
        metrics.append(score_case(pred, labels.data, ds.num_classes, labels.spacing, True))
    expect = summarize(metrics, ds.label_names)["mean_foreground_dice"]
    assert res["methods"]["unet +tta"]["summary"]["mean_foreground_dice"][0] == pytest.approx(expect, abs=1e-9)
