"""One definition per method: the registry, the config policy, and `train` = `bench`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from inrseg.cli import train as train_cli
from inrseg.core.errors import InputError
from inrseg.data.layouts import open_dataset
from inrseg.eval.bench import build_segmenter
from inrseg.methods.configs import config_from_dict, config_to_dict, field_help, parse_set, read_override_file
from inrseg.methods.registry import ENTRIES, capabilities, parse_methods, parse_spec, resolve

from conftest import write_blobs


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    return {2: write_blobs(root / "d2", n=4, shape=(24, 24)), 3: write_blobs(root / "d3", n=4, shape=(16, 16, 16))}


@pytest.mark.parametrize("method", list(ENTRIES))
@pytest.mark.parametrize("nd", [2, 3])
def test_train_and_bench_build_the_identical_model(method, nd, datasets, cli, tmp_path, monkeypatch):
    """`inrseg train METHOD` and `inrseg bench --methods METHOD` on the same data with the same seed
    and budget build a model of the same class with the same resolved config."""
    if nd not in ENTRIES[method].cls.spatial_ndims:
        pytest.skip(f"{method} does not segment {nd}D data")
    seen = {}

    def capture(model, *args, **kwargs):
        seen["model"] = model
        raise _Stop

    monkeypatch.setattr(train_cli, "fit_and_save", capture)
    with pytest.raises(_Stop):
        train_cli.train_model(method, datasets[nd], tmp_path / "m.safetensors", budget_minutes=3.0, seed=2,
                              device="cpu")
    trained = seen["model"]
    benched = build_segmenter(parse_spec(method), open_dataset(datasets[nd]), 2, 3.0, trained.device)
    assert type(trained) is type(benched)
    assert dataclasses.asdict(trained.config) == dataclasses.asdict(benched.config)
    assert trained.num_params == benched.num_params


def test_data_picks_the_preset_and_backbone(datasets):
    """The defaults that depend on the data: MetaSeg's 3D preset and MORSE's 3D backbone."""
    assert resolve("metaseg", 3)[1] == resolve("metaseg", 3, preset="3d-seg4")[1]
    assert resolve("metaseg", 2)[1] == resolve("metaseg", 2, preset="2d-seg4")[1]
    assert resolve("morse", 3)[1].backbone == "unet3d" and resolve("morse", 2)[1].backbone == "unet"
    assert resolve("morse:pointrend:unetr", 3)[1].backbone == "unetr"


def test_precedence_preset_file_set_flags(tmp_path):
    """preset < override file < --set < typed flags; the file may name the preset."""
    f = tmp_path / "exp.toml"
    f.write_text('preset = "unet-paper"\nlr = 0.002\nsteps = 50\nbatch_size = 3\n')
    cfg = resolve("unet", 2, config_file=f, sets=["steps=70"], options={"batch_size": 5})[1]
    assert cfg.channels == (32, 64, 128, 256, 512)     # the file's preset
    assert (cfg.lr, cfg.steps, cfg.batch_size) == (0.002, 70, 5)
    j = tmp_path / "exp.json"
    j.write_text(json.dumps({"lr": 0.5}))
    assert resolve("unet", 2, preset="unet-small", config_file=j)[1].lr == 0.5


def test_set_parses_json_values_and_refuses_unknown_keys():
    cls = ENTRIES["unet"].config_recipe.config_class
    assert parse_set(cls, ["channels=[8,16]", "lr=1e-3", "augment=false", "normalization=zscore"]) == {
        "channels": (8, 16), "lr": 1e-3, "augment": False, "normalization": "zscore"}
    with pytest.raises(InputError, match="did you mean steps"):
        parse_set(cls, ["stepz=3"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_set(cls, ["steps"])
    with pytest.raises(InputError, match="no field"):
        read_override_file(cls, _write(cls, "nope = 1\n"))


def _write(cls, text):
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "x.toml"
    p.write_text(text)
    return p


def test_field_flags_reach_every_field():
    """Every config field is a flag of `train`: values, switches and negated switches."""
    cls = ENTRIES["nisf"].config_recipe.config_class
    assert train_cli.field_flags(cls, ["--infer-max-steps", "20", "--augment-elastic=1.5"]) == [
        "infer_max_steps=20", "augment_elastic=1.5"]
    bools = [f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")]
    if bools:
        flag = bools[0].replace("_", "-")
        assert train_cli.field_flags(cls, [f"--{flag}", f"--no-{flag}"]) == [f"{bools[0]}=true", f"{bools[0]}=false"]
    with pytest.raises(InputError, match="no such option"):
        train_cli.field_flags(cls, ["--not-a-field", "1"])
    with pytest.raises(InputError, match="needs a value"):
        train_cli.field_flags(cls, ["--infer-max-steps"])


@pytest.mark.parametrize("method", list(ENTRIES))
def test_every_config_field_has_a_meaning_and_round_trips(method):
    """`inrseg config` can describe every field, and the checkpoint form reads back equal."""
    e = ENTRIES[method]
    cls = e.config_recipe.config_class
    helps = field_help(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a one-line meaning: {missing}"
    for preset in e.config_recipe.presets:
        for nd in e.cls.spatial_ndims:
            if method == "nnunet" and nd == 2 and preset.startswith("3d"):
                with pytest.raises(InputError, match="2d configuration only"):
                    resolve(method, nd, preset=preset)
                continue
            cfg = resolve(method, nd, preset=preset)[1]
            assert config_from_dict(cls, json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_config_policy_ignores_unknown_and_fills_missing():
    cls = ENTRIES["unet"].config_recipe.config_class
    cfg = config_from_dict(cls, {"steps": 7, "from_the_future": 1})
    assert cfg.steps == 7 and cfg.lr == cls().lr


def test_config_and_methods_commands(cli):
    res = cli("config", "metaseg", "--ndim", "3")
    assert res.code == 0, res.err
    fields = [f.name for f in dataclasses.fields(ENTRIES["metaseg"].config_recipe.config_class)]
    listed = [line.split()[0] for line in res.out.splitlines()[1:]]
    assert listed == fields and "3d-seg4" in res.out.splitlines()[0]
    res = cli("config", "unet", "--json", "--set", "steps=9")
    assert json.loads(res.out)["steps"] == 9
    res = cli("methods")
    assert res.code == 0 and all(e.grammar in res.out for e in ENTRIES.values())
    assert cli("config", "nope").code == 2


def test_spec_grammar():
    specs = parse_methods("unet, morse:pointrend:unetr ,metaseg:2d-seg24")
    assert [(s.method, s.parts) for s in specs] == [("unet", ()), ("morse", ("pointrend", "unetr")),
                                                    ("metaseg", ("2d-seg24",))]
    for bad in ("unet:nope", "nope", "unet,unet", "unet:unet-small:x", ""):
        with pytest.raises(InputError):
            parse_methods(bad)


def test_capabilities_come_from_the_classes():
    assert "held-out slices" in capabilities(ENTRIES["nisf"].cls)
    assert "planes" in capabilities(ENTRIES["nisf"].cls)
    assert "fit diagnostics" in capabilities(ENTRIES["metaseg"].cls)
    assert "held-out slices" not in capabilities(ENTRIES["unet"].cls)
