"""NISF at test time: fitting a latent code to an image with the network frozen, and the
validation steps curve that chooses how many fitting steps to take.

Fitting: the network's weights are frozen (``requires_grad`` off, untouched); a latent
initialised to ``N(0, latent_init_std^2)`` (the same seeded draw for every image, so an image's
result does not depend on which other images share its batch) is optimised with Adam on
``alpha * BCE(reconstruction, intensity) + latent_reg * mean(h^2)``: intensities only, never
labels. Several images are fitted together: latents ``(B, L)``, points ``(B, N, d)``, and the
loss is the *sum* over images of each image's mean, so each latent receives exactly its own
gradient.

Steps curve: all validation cases are fitted in one batch for ``infer_max_steps`` steps; every
``curve_every`` steps (and at step 0 and the last) each case's mean foreground Dice is
:func:`~inrseg.methods.nisf.field.mean_dice` (3D + t: the mean over its annotated frames,
ignored voxels excluded: the definition ``inrseg evaluate`` reports). The best step >= 1 is
the model's inference step count.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from inrseg.core.progress import progress, status
from inrseg.data.volume import IGNORE, Volume
from inrseg.engine import Budget
from inrseg.methods.nisf.field import NISFField, Subject, mean_dice, point_weights

__all__ = ["LatentFit", "LatentFitting"]


@dataclass
class LatentFit:
    """A latent code fitted to one image, with the geometry needed to query it anywhere.

    Attributes:
        latent: ``(L,)`` float32, CPU.
        shape: grid shape ``S`` of the image it was fitted to.
        spacing: mm per voxel of the spatial axes.
        affine: ``(4, 4)`` voxel -> world (mm) of that grid.
        spatial_ndim: 2, 3 or 4 (3D + t).
        time_step: frame interval for 4D images, else ``None``.
        steps: optimisation steps it was fitted for.
        path: the image file, if any.
    """

    latent: torch.Tensor
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    spatial_ndim: int
    time_step: float | None = None
    steps: int = 0
    path: Path | None = None


class LatentFitting(NISFField):
    """Latent fitting and the choice of its step count (see the module doc).

    Attributes:
        infer_steps: the fitting steps :meth:`fit_latents` takes by default (chosen on
            validation by ``fit``, else ``config.infer_steps``).
    """

    infer_steps: int

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Network in eval mode with its weights frozen (``requires_grad=False``) inside the
        block; the flags are restored after."""
        flags = [p.requires_grad for p in self.net.parameters()]
        self.net.eval()
        try:
            for p in self.net.parameters():
                p.requires_grad_(False)
            yield
        finally:
            for p, f in zip(self.net.parameters(), flags):
                p.requires_grad_(f)

    def initial_latent(self, seed: int | None = None) -> torch.Tensor:
        """The seeded inference initialisation ``(L,) ~ N(0, latent_init_std^2)``, CPU, drawn from
        ``seed + 1`` (default ``config.seed``)."""
        gen = torch.Generator(device="cpu").manual_seed((self.config.seed if seed is None else seed) + 1)
        return torch.randn(self.config.latent_dim, generator=gen, device="cpu") * self.config.latent_init_std

    def optimise_latents(self, coords: list[torch.Tensor], targets: list[torch.Tensor], steps: int,
                         callback: Callable[[int, torch.Tensor], bool | None] | None = None,
                         desc: str = "fitting latents", seed: int | None = None) -> torch.Tensor:
        """Optimise one latent per image on reconstruction BCE + latent L2, network frozen.

        With ``config.infer_points`` a step uses that many of an image's points, drawn from
        ``(seed, step)`` alone (the same draw whatever the batch); otherwise all points, in
        chunks of ``config.chunk`` whose gradients accumulate.

        Args:
            coords: per image ``(N_b, d)`` coordinates of the observed voxels (CPU).
            targets: per image ``(N_b, C_in)`` intensities in [0, 1] (CPU).
            steps: Adam steps.
            callback: called as ``callback(step, latents (B, L))`` after step 0 (the initial
                latent) and after every step; returning ``True`` ends the fit there.
            desc: the progress bar's label.
            seed: seeds the initial latent and the point draws (default ``config.seed``).

        Returns:
            latents ``(B, L)`` on the CPU.
        """
        cfg = self.config
        seed = cfg.seed if seed is None else seed
        B = len(coords)
        sizes = [c.shape[0] for c in coords]
        n_max = max(sizes)
        d = coords[0].shape[1]
        X = pad_sequence(list(coords), batch_first=True)             # (B, n_max, d)
        Y = pad_sequence(list(targets), batch_first=True)            # (B, n_max, C_in)
        Wt = point_weights(sizes)                                    # (B, n_max), 0 on padding
        h = self.initial_latent(seed).expand(B, -1).clone().to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([h], lr=cfg.infer_lr)
        use_subsets = cfg.infer_points is not None and cfg.infer_points < n_max
        with self.frozen(), torch.enable_grad():
            stop = callback is not None and bool(callback(0, h.detach().cpu()))
            for step in progress(range(steps), desc=desc):
                if stop:
                    break
                opt.zero_grad(set_to_none=True)
                if use_subsets:
                    # the same draw for every image (seeded by step): batch-independent results
                    idx = torch.stack([torch.from_numpy(np.random.default_rng([seed, step]).choice(
                        sizes[b], size=min(cfg.infer_points, sizes[b]), replace=False))
                        if sizes[b] > cfg.infer_points else
                        torch.arange(sizes[b], device="cpu").repeat(
                            math.ceil(cfg.infer_points / sizes[b]))[: cfg.infer_points]
                        for b in range(B)])                                   # (B, n)
                    xs = torch.gather(X, 1, idx[..., None].expand(-1, -1, d))
                    ys = torch.gather(Y, 1, idx[..., None].expand(-1, -1, self.in_channels))
                    ws = torch.full(idx.shape, 1.0 / idx.shape[1], device="cpu")
                    batches = [(xs, ys, ws)]
                else:
                    batches = [(X, Y, Wt)]                  # all points, chunked below
                for xs, ys, ws in batches:
                    for sl in self.chunks(xs.shape[1], B):
                        dev = self.device
                        rec = self.net.reconstruct(xs[:, sl].to(dev), h)
                        bce = F.binary_cross_entropy_with_logits(rec, ys[:, sl].to(dev), reduction="none")
                        loss = cfg.alpha * (bce.mean(-1) * ws[:, sl].to(dev)).sum()
                        loss.backward()                     # accumulates into h.grad per chunk
                reg = cfg.latent_reg * h.pow(2).mean(-1).sum()
                reg.backward()
                opt.step()
                stop = callback is not None and bool(callback(step + 1, h.detach().cpu()))
        return h.detach().cpu()

    def fit_latents(self, images: Sequence[Volume], steps: int | None = None,
                    observed: Sequence[np.ndarray | None] | None = None, seed: int | None = None) -> list[LatentFit]:
        """Fit one latent per image, all in one batch (network frozen).

        Args:
            images: ``(C_in, *S)`` Volumes (shapes may differ).
            steps: optimisation steps (default: :attr:`infer_steps`).
            observed: optional per image boolean ``(*S,)`` masks; the latent sees only voxels
                where the mask is ``True`` (e.g. :func:`~inrseg.data.planes.heldout_mask`).
            seed: seeds the initial latent and the point draws (default ``config.seed``).

        Returns:
            one :class:`LatentFit` per image.
        """
        steps = self.infer_steps if steps is None else int(steps)
        subs = [self.prepare(img, observed=None if observed is None else observed[k])
                for k, img in enumerate(images)]
        coords, targets = [s.coords for s in subs], [s.intensity for s in subs]
        lat = self.optimise_latents(coords, targets, steps, seed=seed)
        return [LatentFit(lat[k].clone(), s.shape, s.spacing, s.affine, self.spatial_ndim,
                          s.time_step, steps, s.path) for k, s in enumerate(subs)]

    # ------------------------------------------------------------------ the steps curve
    def select_infer_steps(self, val_pairs: Sequence[tuple[Volume, Volume]],
                           budget: Budget | None = None) -> tuple[int, list[dict]]:
        """:meth:`infer_steps_curve` of labelled ``(image, labels)`` Volume pairs."""
        return self.infer_steps_curve([self.prepare(img, lab) for img, lab in val_pairs], budget)

    def infer_steps_curve(self, subs: list[Subject], budget: Budget | None = None) -> tuple[int, list[dict]]:
        """The validation steps curve of prepared, labelled cases: mean foreground Dice every
        ``curve_every`` steps up to ``infer_max_steps`` (all cases fitted in one batch); stops
        early, keeping the best step so far, when ``budget`` expires.

        Returns:
            the best step (>= 1; ``config.infer_steps`` if the curve has none) and the curve
            ``[{"step", "dice", "per_case"}]`` in step order.
        """
        cfg = self.config
        budget = budget if budget is not None else Budget(None)
        gts = [s.labels.numpy().reshape(s.shape) for s in subs]
        curve: list[dict] = []
        every = max(1, cfg.curve_every)

        def record(step: int, lat: torch.Tensor) -> bool:
            over = budget.expired()
            if step % every and step != cfg.infer_max_steps and not over:
                return False
            scores = self.curve_scores(subs, gts, lat)
            curve.append({"step": step, "dice": float(np.nanmean(scores)),
                          "per_case": [float(x) for x in scores]})
            return over

        self.optimise_latents([s.coords for s in subs], [s.intensity for s in subs],
                              cfg.infer_max_steps, callback=record, desc="validation steps curve")
        if curve[-1]["step"] < cfg.infer_max_steps:
            status(f"nisf: time budget reached at step {curve[-1]['step']} of the validation steps curve")
        candidates = [c for c in curve if c["step"] >= 1 and not math.isnan(c["dice"])]
        best = max(candidates, key=lambda c: c["dice"]) if candidates else {"step": cfg.infer_steps}
        return int(best["step"]), curve

    def curve_scores(self, subs: list[Subject], gts: list[np.ndarray], lat: torch.Tensor) -> list[float]:
        """Mean foreground Dice of each case under its latent ``lat[b]`` (``lat (B, L)``), on its
        grid (``gts``: label maps ``(*S,)``, ``IGNORE`` where unlabelled, excluded); for 3D + t
        only the annotated frames are predicted and scored."""
        scores = []
        for b, (s, gt) in enumerate(zip(subs, gts)):
            coords, shape = s.coords, s.shape
            if self.spatial_ndim == 4:  # only the annotated frames are scored: predict only those
                frames = np.flatnonzero((gt != IGNORE).reshape(-1, shape[3]).any(0))
                if frames.size < shape[3]:
                    d = coords.shape[-1]
                    coords = coords.reshape(*shape, d)[..., torch.from_numpy(frames), :].reshape(-1, d)
                    shape, gt = (*shape[:3], int(frames.size)), gt[..., frames]
            pred = self.query(coords[None], lat[b: b + 1], want_image=False)["labels"][0]
            scores.append(mean_dice(pred.numpy().reshape(shape), gt, self.num_classes, IGNORE)[1])
        return scores

    def curve_seconds(self, subs: list[Subject]) -> float:
        """Estimated wall time of the steps curve on ``subs``: the time of a latent step x
        ``infer_max_steps`` plus that of a Dice evaluation x the curve's evaluations, both timed
        warm (the first call of each pays one-off costs). The network's weights do not change
        the cost."""
        cfg = self.config
        gts = [s.labels.numpy().reshape(s.shape) for s in subs]
        stamps: list[float] = []
        lat = self.optimise_latents([s.coords for s in subs], [s.intensity for s in subs], 5,
                                    callback=lambda step, h: stamps.append(time.perf_counter()),
                                    desc="timing the steps curve")
        per_step = (stamps[5] - stamps[1]) / 4                    # steps 2 to 5
        self.curve_scores(subs, gts, lat)
        t0 = time.perf_counter()
        self.curve_scores(subs, gts, lat)
        per_evaluation = time.perf_counter() - t0
        evaluations = cfg.infer_max_steps // max(1, cfg.curve_every) + 2
        return cfg.infer_max_steps * per_step + evaluations * per_evaluation
