"""Behaviour unchanged by the restructuring: every method's checkpoint made at the commit before it
(tests/fixtures/equivalence, see make.py there) loads and predicts what it predicted then, and a
retrain from its stored config with the same seed and data gives the same weights, bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from inrseg.engine.checkpoints import load_checkpoint, read_metadata
from inrseg.methods.configs import config_from_dict
from inrseg.methods.registry import entry, load_segmenter

HERE = Path(__file__).resolve().parent / "fixtures" / "equivalence"
_spec = importlib.util.spec_from_file_location("equivalence_make", HERE / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


@pytest.fixture(autouse=True)
def _one_thread():
    """The fixtures were made with one intra-op thread (float summation order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(make.CASES))
def test_old_checkpoint_loads_and_predicts_the_same(name, tmp_path):
    method, shape, _ = make.CASES[name]
    model = load_segmenter(HERE / f"{name}.safetensors")
    assert model.method == method and model.spatial_ndim == len(shape)
    _, _, test_image = make.phantom_split(tmp_path, shape)
    torch.manual_seed(0)
    labels = model.predict(test_image).data
    np.testing.assert_array_equal(labels, np.load(HERE / f"{name}.labels.npz")["labels"])


@pytest.mark.parametrize("name", sorted(make.CASES))
def test_retraining_from_the_stored_config_gives_the_same_weights(name, tmp_path):
    method, shape, _ = make.CASES[name]
    path = HERE / f"{name}.safetensors"
    old, meta = load_checkpoint(path, method)
    cls = entry(method).cls
    cfg = config_from_dict(cls.config_class, read_metadata(path)["config"], path)
    train, val, test_image = make.phantom_split(tmp_path, shape)
    torch.manual_seed(0)
    model = cls(make.NAMES, len(shape), 1, cfg)
    model.fit(train, val)
    new = model.state_tensors()
    assert sorted(new) == sorted(old)
    for key in old:
        assert torch.equal(new[key].cpu(), old[key]), f"{name}: {key} differs from the pre-restructuring run"
    assert model.best_step == meta.get("best_step")
    np.testing.assert_array_equal(model.predict(test_image).data, np.load(HERE / f"{name}.labels.npz")["labels"])
