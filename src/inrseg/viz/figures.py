"""Figures of the INR methods (PNG, matplotlib Agg): MetaSeg's Dice / PSNR against test-time
steps (the paper's Fig. 2) and the PCA of a fitted INR's penultimate features (Fig. 4)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from inrseg.data.io import Volume, atomic_path
from inrseg.metrics import case_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _plt().close(fig)
    return path


def metaseg_step_curve(model, image: Volume, labels: Volume,
                       steps: Sequence[int] = (0, 1, 2, 5, 10, 25, 50, 100, 200, 500)) -> list[dict]:
    """Fit ``image`` from the meta-learned theta* and record, after each of ``steps`` test-time
    steps, the mean foreground Dice of the head's labels and the PSNR (dB, intensities
    normalised to [0, 1]) of the reconstruction.

    Returns:
        ``[{"step", "dice", "psnr_db"}]`` in step order.
    """
    from inrseg.nn.siren import siren_forward

    prepared = model._prepare(image, labels)
    steps = sorted({int(s) for s in steps})
    curve = []
    for t, theta in model.fit_theta([prepared], max(steps), snapshots=steps):
        with torch.no_grad():
            recon = torch.cat([siren_forward(theta, prepared.coords[None, s:s + 16384], model.config.w0)[0]
                               for s in range(0, prepared.coords.shape[0], 16384)], 1)[0]
            mse = float((recon - prepared.pixels).pow(2).mean())
            pred = model.image_logits(theta, prepared)[0].argmax(-1).reshape(image.shape).cpu().numpy()
        dice = case_metrics(pred, labels.data, len(model.label_names), distances=False).mean_foreground_dice
        curve.append({"step": t, "dice": float(dice), "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12))})
    return curve


def plot_step_curves(curves: dict[str, list[dict]], path: str | Path, t_f: int | None = None) -> Path:
    """Two panels, Dice and PSNR against test-time steps (log-x), one line per curve name."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, curve in curves.items():
        x = [max(c["step"], 0.5) for c in curve]
        axes[0].plot(x, [c["dice"] for c in curve], marker="o", ms=3, label=name)
        axes[1].plot(x, [c["psnr_db"] for c in curve], marker="o", ms=3, label=name)
    for ax, lab in zip(axes, ("mean foreground Dice", "PSNR (dB)")):
        ax.set_xscale("log")
        ax.set_xlabel("test-time steps (0 plotted at 0.5)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        if t_f is not None:
            ax.axvline(max(t_f, 0.5), color="k", ls="--", lw=0.8, label=f"T_f = {t_f}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def feature_pca_png(model, image: Volume, path: str | Path, steps: int | None = None) -> Path:
    """Image | first three principal components of the fitted INR's penultimate features as
    RGB | predicted labels, for a 2D image (or the middle slice of a 3D one)."""
    plt = _plt()
    prepared = model._prepare(image)
    theta = None
    for _, theta in model.fit_theta([prepared], model.t_f if steps is None else steps):
        pass
    feats = model.features(theta, prepared.coords)[0]                      # (N, h), model's device
    with torch.no_grad():
        pred = model.image_logits(theta, prepared)[0].argmax(-1).reshape(image.shape).cpu().numpy()
    x = feats - feats.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    pcs = (x @ v[:3].T).reshape(*image.shape, 3).cpu().numpy()
    lo, hi = np.percentile(pcs, 1, axis=tuple(range(pcs.ndim - 1))), np.percentile(pcs, 99, axis=tuple(range(pcs.ndim - 1)))
    rgb = np.clip((pcs - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    img = image.data[0]
    if image.spatial_ndim == 3:
        z = image.shape[2] // 2
        rgb, img, pred = rgb[:, :, z], img[:, :, z], pred[:, :, z]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    axes[0].imshow(img.T, cmap="gray", origin="lower")
    axes[1].imshow(np.transpose(rgb, (1, 0, 2)), origin="lower")
    axes[2].imshow(pred.T, cmap="tab10", vmin=0, vmax=9, origin="lower", interpolation="nearest")
    for ax, t in zip(axes, ("image", "PCA of INR features (RGB = PC1-3)", "labels from the head")):
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


DIAGNOSTIC_STEPS = (0, 2, 5, 10, 25, 50, 100, 200)


def metaseg_diagnostic(model, pairs: Sequence[tuple[Volume, Volume]],
                       steps: Sequence[int] = DIAGNOSTIC_STEPS) -> dict[str, list[dict]]:
    """MetaSeg's diagnostic: Dice against test-time steps for the meta-learned head and for
    the phase-2 head, on labelled ``pairs`` (validation images, never test images).

    Each image is fitted once (pixels only, head frozen, as at test time); at every ``t`` in
    ``steps`` both heads read labels off the same fitted features. A working meta-learned
    initialisation is already a usable atlas at ``t`` = 0-2 ("atlas Dice").

    Returns:
        ``{head: [{"step", "dice", "per_class": [C floats]}]}`` with head ``"meta-learned"``
        (when the model kept it) and ``"phase 2"``; Dice is the mean over images (per class:
        NaN-aware, classes absent from an image and its prediction skipped).
    """
    heads = {"phase 2": {k: v for k, v in model.params.items() if k.startswith("g.")}}
    if getattr(model, "meta_head", None):
        heads = {"meta-learned": model.meta_head, **heads}
    steps = sorted({int(s) for s in steps})
    C = len(model.label_names)
    scores = {h: {t: [] for t in steps} for h in heads}
    for image, labels in pairs:
        prepared = model._prepare(image, labels)
        for t, theta in model.fit_theta([prepared], max(steps), snapshots=steps):
            for name, head in heads.items():
                pred = model.image_logits(theta, prepared, head)[0].argmax(-1)
                m = case_metrics(pred.reshape(image.shape).cpu().numpy(), labels.data, C, distances=False)
                scores[name][t].append(m.dice)
    out: dict[str, list[dict]] = {}
    for name, by_t in scores.items():
        out[name] = []
        for t in steps:
            per_class = np.nanmean(np.stack(by_t[t]), axis=0)       # (C,)
            out[name].append({"step": t, "dice": float(np.nanmean(per_class[1:])),
                              "per_class": [float(x) for x in per_class]})
    return out


def plot_diagnostic(curves: dict[str, list[dict]], path: str | Path, title: str = "",
                    t_f: int | None = None) -> Path:
    """Mean foreground Dice against test-time steps (log-x, step 0 drawn at 0.5), one line per head."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, curve in curves.items():
        ax.plot([max(c["step"], 0.5) for c in curve], [c["dice"] for c in curve], marker="o", ms=3, label=name)
    if t_f:
        ax.axvline(t_f, color="grey", ls=":", lw=1, label=f"T_f = {t_f}")
    ax.set_xscale("log")
    ax.set_xlabel("test-time steps T (0 drawn at 0.5)")
    ax.set_ylabel("mean foreground Dice (validation)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
