"""MetaSeg's fit diagnostics: the data of ``inrseg figures`` (the plots are :mod:`inrseg.viz.figures`').

:class:`Diagnostics` implements :class:`~inrseg.methods.base.FitDiagnostics` for
:class:`~inrseg.methods.metaseg.MetaSeg`: Dice and PSNR against test-time steps (the paper's
Fig. 2), the principal components of the fitted INR's penultimate features (Fig. 4), and the Dice
of the meta-learned and the phase-2 head against test-time steps on labelled (validation) images.
Each image is fitted as at test time (pixels only, head frozen).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from inrseg.data.volume import Volume
from inrseg.metrics import case_metrics
from inrseg.nn.siren import siren_forward

__all__ = ["DIAGNOSTIC_STEPS", "STEP_CURVE_STEPS", "Diagnostics"]

#: test-time step counts of :meth:`Diagnostics.step_curve` by default
STEP_CURVE_STEPS = (0, 1, 2, 5, 10, 25, 50, 100, 200, 500)
#: test-time step counts of :meth:`Diagnostics.diagnostic` by default
DIAGNOSTIC_STEPS = (0, 2, 5, 10, 25, 50, 100, 200)
#: points per forward chunk of the reconstruction in :meth:`Diagnostics.step_curve`
_RECON_CHUNK = 16384


class Diagnostics:
    """The :class:`~inrseg.methods.base.FitDiagnostics` of MetaSeg (mixed into it; reads its
    ``prepare``, ``fit_theta``, ``fitted_theta``, ``features``, ``image_logits``, ``params``,
    ``meta_head``, ``t_f``, ``label_names`` and ``config``)."""

    def step_curve(self, image: Volume, labels: Volume, steps: Sequence[int] = STEP_CURVE_STEPS) -> list[dict]:
        """Fit ``image`` ``(C, *S)`` from ``theta*`` and record, after each of ``steps`` test-time
        steps, the mean foreground Dice of the head's labels against ``labels`` ``(*S,)`` and the
        PSNR (dB, intensities normalised to [0, 1]) of the reconstruction.

        Returns:
            ``[{"step", "dice", "psnr_db"}]`` in step order.
        """
        prepared = self.prepare(image, labels)
        steps = sorted({int(s) for s in steps})
        curve = []
        for t, theta in self.fit_theta([prepared], max(steps), snapshots=steps):
            with torch.no_grad():
                recon = torch.cat([siren_forward(theta, prepared.coords[None, s:s + _RECON_CHUNK], self.config.w0)[0]
                                   for s in range(0, prepared.coords.shape[0], _RECON_CHUNK)], 1)[0]
                mse = float((recon - prepared.pixels).pow(2).mean())
                pred = self.image_logits(theta, prepared)[0].argmax(-1).reshape(image.shape).cpu().numpy()
            dice = case_metrics(pred, labels.data, len(self.label_names), distances=False).mean_foreground_dice
            curve.append({"step": t, "dice": float(dice), "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12))})
        return curve

    def feature_components(self, image: Volume, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first three principal components of the penultimate features of the INR fitted to
        ``image`` ``(C, *S)`` for ``steps`` test-time steps (default ``T_f``), each scaled from its
        1st-99th percentile to [0, 1]: ``rgb`` ``(*S, 3)`` float; and the predicted labels
        ``(*S,)`` int64 of that fit."""
        prepared = self.prepare(image)
        theta = self.fitted_theta([prepared], self.t_f if steps is None else steps)
        feats = self.features(theta, prepared.coords)[0]                      # (N, h), model's device
        with torch.no_grad():
            pred = self.image_logits(theta, prepared)[0].argmax(-1).reshape(image.shape).cpu().numpy()
        x = feats - feats.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        pcs = (x @ v[:3].T).reshape(*image.shape, 3).cpu().numpy()
        axes = tuple(range(pcs.ndim - 1))
        lo, hi = np.percentile(pcs, 1, axis=axes), np.percentile(pcs, 99, axis=axes)
        rgb = np.clip((pcs - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
        return rgb, pred

    def diagnostic(self, pairs: Sequence[tuple[Volume, Volume]],
                   steps: Sequence[int] = DIAGNOSTIC_STEPS) -> dict[str, list[dict]]:
        """Dice against test-time steps for the meta-learned head and for the phase-2 head, on
        labelled ``pairs`` (validation images, never test images). Each image is fitted once; at
        every ``t`` in ``steps`` both heads read labels off the same fitted features.

        Returns:
            ``{head: [{"step", "dice", "per_class": [K floats]}]}`` with head ``"meta-learned"``
            (when the model kept it) and ``"phase 2"`` (the model's head); Dice is the mean over
            images (per class: NaN-aware, classes absent from an image and its prediction
            skipped), ``"dice"`` the mean over the foreground classes.
        """
        heads = {"phase 2": {k: v for k, v in self.params.items() if k.startswith("g.")}}
        if self.meta_head:
            heads = {"meta-learned": self.meta_head, **heads}
        steps = sorted({int(s) for s in steps})
        K = len(self.label_names)
        scores: dict[str, dict[int, list]] = {h: {t: [] for t in steps} for h in heads}
        for image, labels in pairs:
            prepared = self.prepare(image, labels)
            for t, theta in self.fit_theta([prepared], max(steps), snapshots=steps):
                for name, head in heads.items():
                    pred = self.image_logits(theta, prepared, head)[0].argmax(-1)
                    m = case_metrics(pred.reshape(image.shape).cpu().numpy(), labels.data, K, distances=False)
                    scores[name][t].append(m.dice)
        out: dict[str, list[dict]] = {}
        for name, by_t in scores.items():
            out[name] = []
            for t in steps:
                per_class = np.nanmean(np.stack(by_t[t]), axis=0)       # (K,)
                out[name].append({"step": t, "dice": float(np.nanmean(per_class[1:])),
                                  "per_class": [float(x) for x in per_class]})
        return out
