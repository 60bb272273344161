"""``inrseg train METHOD``, ``inrseg config METHOD`` and ``inrseg methods``: every method through
one command, every config field reachable from the command line.

A config is resolved by :func:`inrseg.methods.registry.resolve` (preset < ``--config FILE`` <
``--set key=value`` and field flags < the typed shorthand flags), the function ``bench`` uses too.
Any config field is also a flag of its own: ``--infer-max-steps 20`` is ``--set
infer_max_steps=20``; a boolean field is a switch (``--meta-sgd``, ``--no-augment``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import typer

from inrseg.core.errors import InputError
from inrseg.core.progress import set_budget, status
from inrseg.cli.app import DEVICE_HELP, SEED_MAX, SEED_MIN, app, budget_minutes_option, fraction, run_on
from inrseg.core.files import check_writable, claim_output, refuse_overlap
from inrseg.data.layouts import open_dataset
from inrseg.data.splits import split_by_subject
from inrseg.engine import Budget, barrier, broadcast_object, is_main, resolve_device
from inrseg.engine.checkpoints import read_metadata
from inrseg.methods.configs import describe, field_types, read_override_file
from inrseg.methods.postprocess import choose_postprocessing
from inrseg.methods.registry import (ENTRIES, SLICEWISE_MODE, build_model, capabilities, check_data_ndim, chosen_preset,
                                     parse_spec, resolve)

__all__ = ["field_flags", "fit_and_save", "open_train_data", "train_config", "train_model"]


# ============================================================================================
# config from the command line
# ============================================================================================

def _is_bool_field(cls: type, key: str) -> bool:
    return field_types(cls).get(key) is bool


def field_flags(cls: type, args: list[str]) -> list[str]:
    """Extra command-line tokens naming config fields (``--infer-max-steps 20``,
    ``--augment-elastic=1.5``, ``--meta-sgd``, ``--no-augment``) as ``key=value`` items.

    Raises:
        InputError: a token that is not a flag, a flag that is no field, a missing value.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    items, i = [], 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise InputError(None, f"unexpected argument {token!r} (see --help)")
        flag, eq, value = token[2:].partition("=")
        key, negated = flag.replace("-", "_"), False
        if key not in names and key.startswith("no_") and key[3:] in names and _is_bool_field(cls, key[3:]):
            key, negated = key[3:], True
        if key not in names:
            raise InputError(None, f"no such option: --{flag} (`inrseg config METHOD` lists the settings; "
                                   f"every one is also a flag)")
        if _is_bool_field(cls, key) and not eq:
            value, i = ("false" if negated else "true"), i + 1
        elif eq:
            i += 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            raise InputError(None, f"--{flag} needs a value")
        items.append(f"{key}={value}")
    return items


#: the longest edge of a 3D training crop
MAX_PATCH_EDGE = 1024


def _patch(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"64"`` -> (64, 64, 64); ``"96,96,64"`` -> (96, 96, 64); None stays None."""
    if text is None:
        return None
    try:
        edges = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--patch {text!r}: expected N or N,N,N") from None
    if len(edges) not in (1, 3) or min(edges) < 8 or max(edges) > MAX_PATCH_EDGE:
        raise typer.BadParameter(f"--patch {text!r}: expected N or N,N,N with edges from 8 to {MAX_PATCH_EDGE}")
    return edges * 3 if len(edges) == 1 else edges


def train_config(method: str, spatial_ndim: int, *, preset: str | None = None, config_file: Path | None = None,
                 sets: list[str] = (), extra: list[str] = (), **options: Any) -> Any:
    """The config ``inrseg train METHOD`` trains on data of ``spatial_ndim``: the registry's
    :func:`~inrseg.methods.registry.resolve` of the preset, the override file, ``--set`` items
    and field flags (``extra``) and the typed flags (``options``; ``None`` = not given)."""
    e = parse_spec(method).entry
    items = [*sets, *field_flags(e.config_recipe.config_class, list(extra))]
    return resolve(method, spatial_ndim, preset=preset, config_file=config_file, sets=items, options=options)[1]


# ============================================================================================
# data, files, the fit
# ============================================================================================

def open_train_data(data: Path, splits: Optional[Path], val_fraction: float, seed: int, method: str):
    """``(dataset, train cases, validation cases)``: the dataset, checked against the method's
    grid dimensionalities, split by subject."""
    ds = open_dataset(data, splits_file=splits)
    check_data_ndim(parse_spec(method), ds.spatial_ndim, data)
    status(f"{ds.name}: {ds.subject_rule}")
    train, val = split_by_subject(ds.train, val_fraction, seed, splits)
    status(f"{ds.name}: {len(train)} training cases, {len(val)} validation cases "
           f"({len({c.subject_id for c in val})} subjects), {len(ds.test)} test cases untouched")
    return ds, train, val


def state_file(out: Path) -> Path:
    """Where an interrupted ``train`` keeps its resumable state: ``OUT.train-state``."""
    return out.with_name(out.name + ".train-state")


def log_file(out: Path) -> Path:
    """The per-step metrics log next to the checkpoint: ``OUT.metrics.jsonl``."""
    return out.with_name(out.name + ".metrics.jsonl")


def check_train_out(out: Path, resume: bool, force: bool) -> None:
    """Before any data is read: ``--out`` (and the state and log beside it) must be writable
    names; a folder at ``--out`` is refused; an existing file is replaced only with ``--force``
    (or by ``--resume`` of the run that wrote it) and only if it is an inrseg model checkpoint;
    an interrupted run's state is never overwritten without ``--resume`` (continue it) or
    ``--force`` (start over)."""
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other")
    if out.is_dir():
        raise InputError(out, f"is a directory: --out names the checkpoint file to write (e.g. "
                              f"{out / 'model.safetensors'})")
    for path, what in ((out, "checkpoint"), (state_file(out), "training state"), (log_file(out), "metrics log")):
        check_writable(path, what)
    resuming = resume and state_file(out).exists()
    if out.exists() or out.is_symlink():
        _check_is_checkpoint(out)
        if not (force or resuming):
            raise InputError(out, "exists (use --force to replace it)")
    if state_file(out).exists() and not (resume or force):
        raise InputError(state_file(out), "holds the state of an interrupted run: add --resume to continue it, "
                                          "or --force to start over")


def _check_is_checkpoint(out: Path) -> None:
    """``out`` is an inrseg model checkpoint (not a training state, not any other file): only
    such a file is ever replaced by ``train``, whatever ``--force`` says."""
    try:
        meta = read_metadata(out)
    except InputError as exc:
        raise InputError(out, f"exists and is not an inrseg checkpoint ({exc.problem}); train replaces "
                              f"only a checkpoint, even with --force (choose another --out)") from None
    if meta.get("kind") == "train-state":
        raise InputError(out, "is a training-state file, not a model checkpoint; train replaces only a "
                              "checkpoint, even with --force (choose another --out)")


def _state_path(out: Path, resume: bool) -> Path:
    """``OUT.train-state``; without ``--resume`` (that is, with ``--force``) a stale one and its
    metrics log are removed by rank 0 before any rank looks for it."""
    state = state_file(out)
    if not resume and is_main():
        for stale in (state, log_file(out)):
            if stale.exists():
                stale.unlink()
    barrier()
    return state


def fit_and_save(model, train, val, out: Path, resume: bool, budget: Budget, precision: str) -> None:
    """Train (every rank), choose the post-processing on the validation cases (rank 0,
    :func:`~inrseg.methods.postprocess.choose_postprocessing`; it is saved with the model) and
    write the checkpoint (rank 0), atomically, holding a lock on
    ``out`` so that two runs never write the same checkpoint; temporary files that a killed
    run left next to it are removed (and named). The resumable state is deleted once the
    checkpoint is written: it exists only while a run is unfinished or was interrupted. A run
    that fails (a bad case found mid-training, a full disk, any error) leaves no trace: its
    state, its metrics log and the folders it created are removed (an interrupted run's state
    and log, kept for --resume, stay as they were; so does everything on Ctrl-C)."""
    state = state_file(out)
    with claim_output(out, state) if is_main() else contextlib.nullcontext():
        try:
            model.fit(train, val, state_path=_state_path(out, resume), budget=budget,
                      log_path=log_file(out), precision=precision)
            # keep-largest-component where it raises validation Dice (rank 0 decides), saved with the model
            model.postprocessing = broadcast_object(choose_postprocessing(model, val, budget=budget)
                                                     if is_main() else None)
            if is_main():
                model.save(out)
                state.unlink(missing_ok=True)
        except Exception:
            if is_main() and not resume:
                for trace in (state, log_file(out)):
                    with contextlib.suppress(OSError):
                        trace.unlink(missing_ok=True)
            raise
        barrier()


def train_model(method: str, data: Path, out: Path, *, budget_minutes: float | None = None,
                val_fraction: float = 0.2, splits: Optional[Path] = None, seed: int = 0, resume: bool = False,
                force: bool = False, device: str = "auto", precision: str = "auto", preset: str | None = None,
                config_file: Path | None = None, sets: list[str] = (), extra: list[str] = (), **options: Any):
    """What ``inrseg train`` does: resolve the config, train, save ``out``; returns the model."""
    refuse_overlap({"--out": out, "--out's training state": state_file(out), "--out's metrics log": log_file(out)},
                   {"--data": data, "--splits": splits, "--config": config_file})
    budget = Budget(budget_minutes)  # the whole command: loading data counts too
    set_budget(budget)
    resolve_device(device)
    check_train_out(out, resume, force)
    ds, train, val = open_train_data(data, splits, val_fraction, seed, method)
    cfg = train_config(method, ds.spatial_ndim, preset=preset, config_file=config_file, sets=list(sets),
                       extra=list(extra), seed=seed, budget_minutes=budget_minutes, **options)
    with run_on(device) as dev:
        model = build_model(parse_spec(method), ds.spatial_ndim, ds.label_names, len(ds.channel_names), cfg,
                            device=dev)
        size = f"{model.num_params / 1e6:.3f}M parameters" if model.num_params else "network planned from the data"
        status(f"{method}: {size}, on {dev}")
        fit_and_save(model, train, val, out, resume, budget, precision)
    chosen = ", ".join(f"{k} {v}" for k, v in model.chosen_settings().items()) or "the last state"
    status(f"saved {out} (chosen on validation: {chosen})")
    return model


_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_EXTRA)
def train(ctx: typer.Context,
          method: str = typer.Argument(..., help="A method or spec (`inrseg methods`): unet, morse:pointrend:unet, "
                                                 f"nisf...; append @{SLICEWISE_MODE} to train its 2D model on 3D "
                                                 "volumes slice by slice (as nnU-Net's 2d)."),
          data: Path = typer.Option(..., help="Dataset directory (nnU-Net, neurite-OASIS or UK Biobank layout)."),
          out: Path = typer.Option(..., help="Checkpoint to write (.safetensors)."),
          preset: Optional[str] = typer.Option(None, help="Preset (default: the method's for the data at hand; "
                                                          "`inrseg config METHOD` shows it)."),
          set_: list[str] = typer.Option([], "--set", help="Override a config field: KEY=VALUE (JSON values; "
                                                           "repeatable). Every field is also a flag: --KEY VALUE."),
          config: Optional[Path] = typer.Option(None, "--config", help="Override file (TOML or JSON table of "
                                                                       "config fields, optional 'preset')."),
          steps: Optional[int] = typer.Option(None, min=1, max=10**9, help="Optimiser steps (outer steps for "
                                                                            "MetaSeg)."),
          budget_minutes: Optional[float] = typer.Option(None, callback=budget_minutes_option,
                                                         help="Wall time of the whole command (best-on-validation "
                                                              "kept)."),
          backbone: Optional[str] = typer.Option(None, help="MORSE: unet, unet3d, transunet or unetr."),
          variant: Optional[str] = typer.Option(None, help="MORSE: baseline, pointrend, smoe, iar or morse."),
          batch_size: Optional[int] = typer.Option(None, min=1, max=65536, help="Slices / patches per step."),
          patch: Optional[str] = typer.Option(None, help="3D training crop in voxels: one edge (64) or three "
                                                         "(96,96,64); default 96^3, capped at the volume."),
          foreground_fraction: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                              help="Share of 3D crops forced to contain "
                                                                   "foreground."),
          val_fraction: float = typer.Option(0.2, callback=fraction,
                                             help="Fraction of training subjects held out for validation."),
          splits: Optional[Path] = typer.Option(None, help="Splits JSON overriding subjects / validation split."),
          seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX,
                                   help="Seed of the weights, the draws and the validation split."),
          resume: bool = typer.Option(False, help="Continue from OUT.train-state if an interrupted run left one."),
          force: bool = typer.Option(False, "--force", help="Start over even if an interrupted run left "
                                                            "OUT.train-state; replace an existing checkpoint "
                                                            "at --out (never another kind of file)."),
          device: str = typer.Option("auto", help=DEVICE_HELP),
          precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA for the CNN methods), fp32 or "
                                                     "bf16.")) -> None:
    """Train a method (2D, 3D or 3D+t, from the data); the checkpoint stores the resolved config
    (`inrseg info`). Under torchrun the work is split across ranks (DDP)."""
    parse_spec(method)
    train_model(method, data, out, budget_minutes=budget_minutes, val_fraction=val_fraction, splits=splits,
                seed=seed, resume=resume, force=force, device=device, precision=precision, preset=preset,
                config_file=config, sets=set_, extra=list(ctx.args), steps=steps, backbone=backbone,
                variant=variant, batch_size=batch_size, patch_size=_patch(patch),
                foreground_fraction=foreground_fraction)


@app.command("config")
def config_cmd(method: str = typer.Argument(..., help="A method (`inrseg methods`)."),
               preset: Optional[str] = typer.Option(None, help="Preset (default: the method's default for --ndim)."),
               ndim: int = typer.Option(2, min=2, max=4, help="Data: 2 (2D), 3 (3D) or 4 (3D+t)."),
               set_: list[str] = typer.Option([], "--set", help="Show the config with these overrides."),
               config: Optional[Path] = typer.Option(None, "--config", help="Show the config with this override "
                                                                            "file."),
               as_json: bool = typer.Option(False, "--json", help="Print the config as JSON.")) -> None:
    """Print every config field of METHOD with its value for the preset and its meaning."""
    e = parse_spec(method).entry
    cfg = resolve(method, ndim, preset=preset, config_file=config, sets=set_)[1]
    if as_json:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    recipe = e.config_recipe
    file_preset = read_override_file(recipe.config_class, config)[0] if config is not None else None
    spec = parse_spec(method)
    chosen = chosen_preset(spec, spec.config_ndim(ndim), preset, file_preset)
    print(f"{method} ({e.config_recipe.config_class.__name__}), preset {chosen} for {spec.config_ndim(ndim)}D data "
          f"(presets: {', '.join(recipe.presets)})")
    rows = describe(cfg)
    width = max(len(k) for k, _, _ in rows)
    vwidth = min(28, max(len(v) for _, v, _ in rows))
    for key, value, meaning in rows:
        print(f"  {key:<{width}}  {value:<{vwidth}}  {meaning}")


@app.command("methods")
def methods_cmd() -> None:
    """List the methods: name, the name:variant grammar of --methods, presets, capabilities."""
    for e in ENTRIES.values():
        recipe = e.config_recipe
        defaults = sorted({recipe.default_preset(n) for n in e.cls.spatial_ndims})
        print(f"{e.grammar}\n  {e.summary}\n  data: {', '.join({2: '2D', 3: '3D', 4: '3D+t'}[n] for n in e.cls.spatial_ndims)}"
              f"; presets: {', '.join(recipe.presets)} (default {' / '.join(defaults)})"
              f"\n  can: {', '.join(capabilities(e.cls))}")
    print(f"\nAny method with a 2D model takes @{SLICEWISE_MODE} (unet@2d, morse:morse:unet@{SLICEWISE_MODE}, "
          f"nisf@{SLICEWISE_MODE}): its 2D model on 3D volumes, slice by slice along the coarsest axis.")
