"""Figures of the methods with fit diagnostics (PNG, matplotlib Agg): Dice / PSNR against
test-time steps (MetaSeg paper's Fig. 2), the principal components of a fitted INR's features
(Fig. 4) and the per-head Dice against test-time steps. The data come from the model
(:class:`~inrseg.methods.base.FitDiagnostics`: ``step_curve``, ``feature_components``,
``diagnostic``); this module only draws them."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from inrseg.core.files import atomic_path
from inrseg.data.volume import Volume

matplotlib.use("Agg")  # files only, no screen: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_step_curves(curves: dict[str, list[dict]], path: str | Path, t_f: int | None = None) -> Path:
    """Two panels, Dice and PSNR against test-time steps (log-x), one line per curve name."""
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


def feature_pca_png(image: Volume, rgb: np.ndarray, labels: np.ndarray, path: str | Path) -> Path:
    """Image | feature components as RGB | predicted labels, for a 2D image (or the middle slice
    along the last axis of a 3D one): ``image`` ``(C, *S)`` (its first channel is drawn), ``rgb``
    ``(*S, 3)`` in [0, 1] and ``labels`` ``(*S,)``, as a model's
    :meth:`~inrseg.methods.base.FitDiagnostics.feature_components` returns them."""
    img = image.data[0]
    if image.spatial_ndim == 3:
        z = image.shape[2] // 2
        rgb, img, labels = rgb[:, :, z], img[:, :, z], labels[:, :, z]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    axes[0].imshow(img.T, cmap="gray", origin="lower")
    axes[1].imshow(np.transpose(rgb, (1, 0, 2)), origin="lower")
    axes[2].imshow(labels.T, cmap="tab10", vmin=0, vmax=9, origin="lower", interpolation="nearest")
    for ax, t in zip(axes, ("image", "PCA of INR features (RGB = PC1-3)", "labels from the head")):
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def plot_diagnostic(curves: dict[str, list[dict]], path: str | Path, title: str = "",
                    t_f: int | None = None) -> Path:
    """Mean foreground Dice against test-time steps (log-x, step 0 drawn at 0.5), one line per head."""
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
