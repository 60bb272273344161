"""Every method trains and segments from the CLI with ``--device cpu`` and ``--device auto``,
and loads onto a device other than the one it was saved from."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_blobs

TRAIN = {
    "unet": ["--steps", "2"],
    "segresnet": ["--steps", "2"],
    "morse": ["--steps", "2", "--variant", "pointrend"],
    "nisf": ["--preset", "nisf-cpu-small", "--steps", "2", "--infer-max-steps", "4"],
    "metaseg": ["--steps", "2", "--budget-minutes", "0.15"],
}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("dev") / "ds", n=4, shape=(32, 32))


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("method", sorted(TRAIN))
def test_train_and_segment_on_device(cli, blobs, tmp_path, method, device):
    model = tmp_path / f"{method}.safetensors"
    r = cli("train", method, "--data", blobs, "--out", model, "--device", device, *TRAIN[method])
    assert r.code == 0, r.err
    assert model.exists() and model.with_name(model.name + ".metrics.jsonl").exists()
    out = tmp_path / "pred"
    r = cli("segment", "--model", model, "--input", blobs / "imagesTr", "--output", out, "--device", device)
    assert r.code == 0, r.err
    assert len(list(out.glob("*.nii.gz"))) == 4


def test_checkpoint_loads_onto_any_device(tmp_path, blobs):
    """Checkpoints hold CPU tensors; a model loads onto the device it is asked for."""
    import torch

    from inrseg.data.layouts import open_dataset
    from inrseg.methods.unet import UNetConfig, UNetSegmenter
    from inrseg.methods.registry import load_segmenter

    ds = open_dataset(blobs)
    m = UNetSegmenter(ds.label_names, 2, 1, UNetConfig(channels=(4, 8, 16), num_res_units=0))
    m.save(tmp_path / "m.safetensors")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    preds = []
    for dev in devices:
        again = load_segmenter(tmp_path / "m.safetensors", device=dev)
        assert next(again.net.parameters()).device.type == dev
        preds.append(again.predict(ds.train[0].load_image()).data)
    for p in preds[1:]:
        assert np.mean(p == preds[0]) > 0.99
