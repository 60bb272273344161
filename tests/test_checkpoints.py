"""Checkpoints: safetensors + JSON header, nested training state, refusal of foreign files."""

from __future__ import annotations

import json

import pytest
import torch

from inrseg.engine.checkpoints import (FORMAT_VERSION, flatten_state, load_checkpoint, load_train_state, read_metadata,
                                save_checkpoint, save_train_state, unflatten_state)
from inrseg.core.errors import InputError
from inrseg.methods.registry import load_segmenter


def test_nested_state_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 7, "hist": [{"a": 1.5}]}
    skel, tensors = flatten_state(state)
    json.dumps(skel)  # JSON-serialisable
    back = unflatten_state(skel, tensors)
    assert back["step"] == 7 and back["hist"] == [{"a": 1.5}]
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    save_train_state(tmp_path / "s", "unet", state)
    loaded = load_train_state(tmp_path / "s", "unet")
    opt2.load_state_dict(loaded["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert list(tmp_path.iterdir()) == [tmp_path / "s"]  # no temp files left


def test_checkpoint_header_and_method_check(tmp_path):
    p = save_checkpoint(tmp_path / "m.safetensors", "unet", {"w": torch.ones(2)}, {"config": {"a": 1}})
    meta = read_metadata(p)
    assert meta["method"] == "unet" and meta["format_version"] == FORMAT_VERSION == 2 and meta["config"] == {"a": 1}
    tensors, _ = load_checkpoint(p, "unet")
    assert tensors["w"].tolist() == [1.0, 1.0]
    with pytest.raises(InputError, match="not 'nisf'"):
        load_checkpoint(p, "nisf")
    save_train_state(tmp_path / "st", "unet", {"x": torch.zeros(1)})
    with pytest.raises(InputError, match="training-state"):
        load_segmenter(tmp_path / "st")


def test_unknown_method_is_a_clear_error(tmp_path):
    p = save_checkpoint(tmp_path / "m.safetensors", "hypernet", {"w": torch.ones(1)}, {})
    with pytest.raises(InputError, match="'hypernet' is not available"):
        load_segmenter(p)
