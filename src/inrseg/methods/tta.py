"""Test-time augmentation and uncertainty maps: one mechanism for every method.

A method says what its members are (:meth:`~inrseg.methods.base.Segmenter.tta_members`, each a
:class:`~inrseg.methods.base.TTAMember` whose logits lie on the plain prediction's grid): the CNN
methods mirror the image over every subset of its axes (the base's default: 2D 4 forward passes,
3D 8), MetaSeg and NISF repeat their test-time fit with other seeds and step counts
(:func:`refit_members`: K fits, default 4). :func:`tta_probabilities` is the one place they are
combined (``inrseg segment --tta`` and ``inrseg bench``): the softmax probabilities of the members,
averaged, and their variance across members. :func:`entropy` is the per-voxel uncertainty of
probabilities (``segment --save-uncertainty``, and :mod:`inrseg.eval.calibration`).

Shapes: an image ``(C, *S)``; probabilities ``(K, *S')`` with ``K`` classes on the grid of
``scale`` (``S' = round(S * scale)``); per-voxel maps ``(*S')``.
"""

from __future__ import annotations

import functools
from typing import Protocol, Sequence

import numpy as np
import torch

from inrseg.data.volume import Volume
from inrseg.methods.base import Segmenter, TTAMember

__all__ = ["DEFAULT_REFITS", "REFIT_STEP_FACTORS", "entropy", "refit_members", "refit_plan", "tta_probabilities"]

#: repeated test-time fits of an INR method's ``--tta`` when no number is given
DEFAULT_REFITS = 4
#: member ``k``'s step count is the chosen one times ``REFIT_STEP_FACTORS[k % 4]`` (member 0: the plain fit)
REFIT_STEP_FACTORS = (1.0, 0.75, 1.25, 1.5)


class RefitLogits(Protocol):
    """An INR method's logits with its test-time fit's seed and step count as keywords
    (``None``: the plain prediction's)."""

    def __call__(self, image: Volume, scale: float | Sequence[float] = 1.0, *, steps: int | None = None,
                 seed: int | None = None) -> tuple[torch.Tensor, np.ndarray]: ...


def refit_plan(steps: int, seed: int, n: int | None = None) -> list[tuple[int, int]]:
    """``(seed, steps)`` of ``n`` (default :data:`DEFAULT_REFITS`) repeated test-time fits around
    the chosen step count ``steps`` and the config's ``seed``: fit ``k`` uses ``seed + k`` and
    ``round(steps * REFIT_STEP_FACTORS[k % 4])`` steps, so fit 0 is the plain prediction's.

    Raises:
        ValueError: ``n`` < 1.
    """
    n = DEFAULT_REFITS if n is None else int(n)
    if n < 1:
        raise ValueError(f"{n} test-time members asked for: at least 1 test-time fit")
    return [(seed + k, max(0, round(steps * REFIT_STEP_FACTORS[k % len(REFIT_STEP_FACTORS)]))) for k in range(n)]


def refit_members(logits: RefitLogits, steps: int, seed: int, n: int | None = None) -> list[TTAMember]:
    """The members of an INR method's test-time augmentation: one fresh test-time fit of
    ``logits`` per :func:`refit_plan` entry (each costs one test-time fit of its step count)."""
    return [TTAMember(f"refit seed {s}, {t} steps", functools.partial(logits, steps=t, seed=s))
            for s, t in refit_plan(steps, seed, n)]


@torch.no_grad()
def tta_probabilities(model: Segmenter, image: Volume, scale: float | Sequence[float] = 1.0,
                      members: int | None = None) -> tuple[Volume, Volume]:
    """Test-time augmented class probabilities of ``image`` ``(C, *S)``.

    Every member of ``model.tta_members(members)`` (``None``: the method's default number) gives
    logits on the grid of ``scale``; their softmax probabilities are averaged (a running mean,
    on the device the logits come on, one member in memory at a time). With one member the mean
    is :meth:`~inrseg.methods.base.Segmenter.predict_probabilities`'s softmax of the logits.

    Returns:
        ``(mean, member_variance)``: ``mean`` ``(K, *S')`` float32, summing to 1 per voxel, on the
        grid of :meth:`~inrseg.methods.base.Segmenter.predict` (its affine); ``member_variance``
        ``(*S')`` float32, the variance across members of each class's probability (population:
        over the K members, Welford's update, exactly 0 where they agree), averaged over the
        classes. Both carry the image's time step and path.

    Raises:
        ValueError: a number of members the method does not have (``tta_members``), or a member
            whose logits are not on the first one's grid.
    """
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    affine = None
    todo = model.tta_members(members)
    for k, member in enumerate(todo, start=1):
        logits, aff = member.logits(image, scale)
        p = torch.softmax(logits.float(), 0)
        if mean is None:
            mean, m2, affine = p.clone(), torch.zeros_like(p), aff
            continue
        if p.shape != mean.shape:
            raise ValueError(f"test-time member {member.name!r} gives logits of shape {tuple(p.shape)}, not "
                             f"{tuple(mean.shape)}")
        p = p.to(mean.device)
        delta = p - mean
        mean += delta / k
        m2 += delta * (p - mean)
    variance = (m2 / len(todo)).mean(0).clamp_min(0)

    def volume(t: torch.Tensor) -> Volume:
        return Volume(t.cpu().numpy().astype(np.float32), np.asarray(affine, float), model.spatial_ndim,
                      image.time_step, path=image.path)

    return volume(mean), volume(variance)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-voxel entropy ``-sum_k p_k ln p_k`` in nats (``0 ln 0 = 0``) of probabilities
    ``(K, *S)``, float32 ``(*S)``: 0 where one class is certain, ``ln K`` at most."""
    p = np.asarray(probabilities, dtype=np.float32)
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.maximum(-terms.sum(0), 0.0).astype(np.float32)
