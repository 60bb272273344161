"""Overlays of label maps on their images, and rendered planes, as PNG (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from inrseg.data.planes import PlaneView
from inrseg.data.volume import Volume
from inrseg.viz.figures import plt, save_png


def save_overlay(image: Volume, pred: np.ndarray, path: str | Path, gt: np.ndarray | None = None,
                 title: str = "", names: Sequence[str] | None = None) -> Path:
    """PNG: image | prediction overlay | ground-truth overlay (middle slice for 3D / 3D+t), with
    a legend of the class colours (``names``: class names by label value; default "class k").

    ``pred`` and ``gt`` are label maps on the image grid ``S``. Atomic write.
    """
    return save_png(overlay_figure(image, pred, gt, title, names), path, dpi=90)


def overlay_figure(image: Volume, pred: np.ndarray, gt: np.ndarray | None = None, title: str = "",
                   names: Sequence[str] | None = None, index: int | None = None):
    """The matplotlib figure of :func:`save_overlay`; ``index``: the slice along the last
    spatial axis of a 3D (or 3D + t, frame 0) case (default: the middle one)."""
    def mid(a: np.ndarray) -> np.ndarray:
        while a.ndim > 2:
            a = a[..., a.shape[-1] // 2 if index is None else index] if a.ndim == 3 else a[..., 0]
        return a

    img = mid(image.data[0])
    panels = [("image", None), ("prediction", mid(pred))] + ([("ground truth", mid(gt))] if gt is not None else [])
    # with names, the palette is fixed by the class list (the same colours on every slice)
    n_classes = len(names) if names is not None else int(max(pred.max(), gt.max() if gt is not None else 0)) + 1
    base = plt.get_cmap("tab10" if n_classes <= 11 else "tab20")
    # label c gets the palette's colour c - 1 (background is masked out), same in every panel
    cmap = ListedColormap([base((c - 1) % base.N) for c in range(max(n_classes, 2))])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, lab) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img.T, cmap="gray", origin="lower")
        if lab is not None:
            ax.imshow(np.ma.masked_equal(lab, 0).T, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5,
                      alpha=0.5, origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    shown = [c for c in range(1, n_classes) if (pred == c).any() or (gt is not None and (gt == c).any())]
    label = (lambda c: names[c] if names is not None and c < len(names) else f"class {c}")
    if shown:
        fig.legend(handles=[Patch(color=cmap(c), alpha=0.7, label=label(c)) for c in shown],
                   loc="lower center", ncol=min(len(shown), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if shown else 0, 1, 1))
    return fig


def save_plane_png(view: PlaneView, path: str | Path, alpha: float = 0.45,
                   title: str | None = None) -> Path:
    """Write a PNG: the plane's image (left) and its labels over the image (right).

    ``view``: ``(nu, nv)`` image and labels. Pixel ``(i, j)`` is drawn with ``i`` horizontal and
    ``j`` vertical (upwards). Atomic.
    """
    img, lab = view.image.T, view.labels.T
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2 * img.shape[0] / max(img.shape[1], 1) + 0.6))
    for ax in axes:
        ax.imshow(img, cmap="gray", origin="lower", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_axis_off()
    n = max(int(lab.max()) + 1, 2)
    colours = plt.get_cmap("tab10")(np.arange(n) % 10)
    colours[0, 3] = 0.0  # background transparent
    axes[1].imshow(np.ma.masked_equal(lab, 0), cmap=ListedColormap(colours), vmin=0, vmax=n - 1,
                   origin="lower", alpha=alpha, interpolation="nearest")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
