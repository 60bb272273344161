"""Point sampling for point-wise refinement (PointRend / MORSE's implicit anatomical rendering).

Small pure functions, 2D and 3D alike, easy to test alone.

Coordinates
-----------
Points are continuous coordinates in ``[-1, 1]`` per grid axis, **in the order of the tensor's
spatial axes** (``(h, w)`` for 2D maps ``(B, C, H, W)``, ``(d, h, w)`` for 3D maps
``(B, C, D, H, W)``), with the field of view mapped like ``align_corners=False``: voxel ``i`` of
an axis of ``n`` voxels has its centre at ``(2 i + 1) / n - 1``. This is the convention of
:mod:`inrseg.data.grids`. (``torch.nn.functional.grid_sample`` wants the reversed order
``(x, y[, z])``; :func:`point_sample` does the flip.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(features: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of a feature map at continuous points.

    Args:
        features: ``(B, C, *S)`` map with ``len(S)`` = 2 or 3.
        coords: ``(B, P, d)`` points in ``[-1, 1]``, axis order of ``S`` (see module docstring).
        mode: ``"bilinear"`` (linear in 3D too) or ``"nearest"`` (for label maps).

    Returns:
        ``(B, C, P)`` sampled values; points outside the map read the border value.
    """
    d = features.dim() - 2
    if coords.shape[-1] != d:
        raise ValueError(f"coords have {coords.shape[-1]} axes, the map has {d}")
    grid = coords.flip(-1).to(features.dtype)
    grid = grid.reshape(grid.shape[0], *([1] * (d - 1)), grid.shape[1], d)  # (B, 1[, 1], P, d)
    out = F.grid_sample(features, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.reshape(out.shape[0], out.shape[1], -1)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class logits: second-largest minus largest logit (<= 0; 0 = a tie).

    Args:
        logits: ``(B, C, ...)`` with ``C >= 2`` classes on axis 1.

    Returns:
        ``(B, 1, ...)``: larger (closer to 0) means more uncertain.
    """
    if logits.shape[1] < 2:
        raise ValueError("uncertainty needs at least 2 classes")
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 1:2] - top2[:, 0:1])


def uniform_points(batch: int, n: int, ndim: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``(batch, n, ndim)`` points drawn uniformly from the field of view ``[-1, 1]^ndim``."""
    return torch.rand(batch, n, ndim, device=device, generator=generator) * 2 - 1


def sample_training_points(logits: torch.Tensor, n: int, k: float = 3.0, rho: float = 0.75,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Uncertainty-biased training points (PointRend / MORSE point selection).

    Draws ``k * n`` candidates uniformly over the field of view, keeps the ``round(rho * n)`` most
    uncertain ones (uncertainty of the bilinearly interpolated ``logits``, see
    :func:`uncertainty`) and fills the remaining ``n - round(rho * n)`` with fresh uniform points.

    Args:
        logits: ``(B, C, *S)`` coarse class logits (detached: no gradient flows through the
            selection).
        n: points per image.
        k: over-sampling factor (``>= 1``).
        rho: fraction of importance-sampled points (``0 <= rho <= 1``).

    Returns:
        ``(B, n, d)`` coordinates in ``[-1, 1]``, the ``round(rho * n)`` uncertain points first.
    """
    if k < 1 or not 0 <= rho <= 1:
        raise ValueError(f"need k >= 1 and 0 <= rho <= 1, got k={k}, rho={rho}")
    b, d = logits.shape[0], logits.dim() - 2
    n_cand = max(n, int(round(k * n)))
    n_imp = int(round(rho * n))
    cand = uniform_points(b, n_cand, d, logits.device, generator)
    with torch.no_grad():
        unc = uncertainty(point_sample(logits.detach(), cand))[:, 0]  # (B, n_cand)
        idx = unc.topk(n_imp, dim=1).indices                           # (B, n_imp)
    picked = torch.gather(cand, 1, idx[..., None].expand(-1, -1, d))
    fill = uniform_points(b, n - n_imp, d, logits.device, generator)
    return torch.cat([picked, fill], dim=1)


def grid_point_coords(shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Cell-centre coordinates ``(prod(S), d)`` of every voxel of a grid ``S`` (C order)."""
    axes = [(2 * torch.arange(m, device=device, dtype=torch.float32) + 1) / m - 1 for m in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def most_uncertain_points(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` most uncertain voxels of a logit map, for inference-time refinement.

    Args:
        logits: ``(B, C, *S)`` class logits on a grid.
        n: points per image (capped at ``prod(S)``).

    Returns:
        ``(indices, coords)``: ``(B, n')`` flat (C-order) voxel indices into ``S`` and their
        ``(B, n', d)`` cell-centre coordinates in ``[-1, 1]``, ``n' = min(n, prod(S))``.
    """
    b, shape = logits.shape[0], tuple(logits.shape[2:])
    unc = uncertainty(logits).reshape(b, -1)
    n = min(n, unc.shape[1])
    idx = unc.topk(n, dim=1).indices
    coords = grid_point_coords(shape, logits.device)[idx]  # (B, n, d)
    return idx, coords
