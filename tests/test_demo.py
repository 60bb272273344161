"""The README's demo, end to end (slow: run with `pytest -m slow` / `make test-slow`)."""

import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end(cli, tmp_path):
    out = tmp_path / "demo"
    res = cli("--quiet", "demo", "--out", out, "--minutes", "0.3")
    assert res.code == 0, res.err
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 4
    assert len(list((out / "overlays").glob("*.png"))) == 4
    assert (out / "dice_psnr_vs_steps.png").exists()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["n_cases"] == 4 and summary["mean_foreground_dice"] > 0.3
    assert "mean foreground" in res.out
