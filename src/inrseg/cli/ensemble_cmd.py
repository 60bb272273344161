"""``inrseg ensemble``: the mean of several models' (or folds') probabilities, nnU-Net-style."""

from __future__ import annotations

from pathlib import Path

import typer

from inrseg.cli.app import app, check_output_dir
from inrseg.eval.ensemble import ensemble_folders


@app.command()
def ensemble(inputs: list[Path] = typer.Option(..., "--input", help="A folder of `segment --save-probabilities` "
                                                                  "output (<case>.npz); repeat for each model "
                                                                  "or fold."),
             output: Path = typer.Option(..., help="Output folder: <case>.nii.gz, the argmax of the mean "
                                                   "probabilities."),
             save_probabilities: bool = typer.Option(False, help="Also write OUTPUT/<case>.npz: the mean "
                                                                 "probabilities (K, *S) float32."),
             force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder.")) -> None:
    """Average the class probabilities of several models or folds, case by case, into label maps
    (as nnUNetv2_ensemble does). Every --input must hold the same cases, each with the same
    label names, grid and affine; nothing is written otherwise. Post-processing is not applied
    (it was chosen for each model alone)."""
    check_output_dir(output, force)
    ensemble_folders(inputs, output, save_probabilities=save_probabilities, force=force)
