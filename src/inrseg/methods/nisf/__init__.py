"""NISF: Neural Implicit Segmentation Functions (Stolt-Anso et al., MICCAI 2023).

An auto-decoder: one network ``f(c, h) -> (class probabilities, intensity)`` maps a continuous
coordinate ``c`` and a per-image latent code ``h`` to a segmentation and a reconstruction.
Prior training learns the network and one latent per training image jointly, with labels; at
test time the network is frozen and a fresh latent is fitted to the image's intensities alone.

The package, by phase:

* :mod:`~inrseg.methods.nisf.config`: :class:`NISFConfig`, :data:`PRESETS`, :data:`RECIPE`;
* :mod:`~inrseg.methods.nisf.field`: images as points, the chunked forward pass, the Dice;
* :mod:`~inrseg.methods.nisf.training`: prior training (:class:`PriorTraining`, its loss and draws);
* :mod:`~inrseg.methods.nisf.latents`: latent fitting and the validation steps curve;
* :mod:`~inrseg.methods.nisf.rendering`: grids, held-out slices, planes, reconstructions;
* :mod:`~inrseg.methods.nisf.segmenter`: :class:`NISF`, the
  :class:`~inrseg.methods.base.Segmenter` (with the ``HeldOutSlices``, ``PlaneRendering``,
  ``StepCurves`` and ``BatchPrediction`` capabilities).

The network is :class:`inrseg.nn.nisf.NISFNet`; ``docs/methods/nisf.md`` describes the method
and how this implementation differs from the paper.
"""

from inrseg.methods.nisf.config import (DEFAULT_PRESET, PRESETS, RECIPE, NISFConfig, build_network,
                                        config_from_preset, default_preset)
from inrseg.methods.nisf.field import NISFField, Subject, load_pair, mean_dice, point_weights
from inrseg.methods.nisf.latents import LatentFit, LatentFitting
from inrseg.methods.nisf.rendering import HeldOutResult, Rendering
from inrseg.methods.nisf.segmenter import NISF
from inrseg.methods.nisf.training import (PriorTraining, annotated_frames, gather_rows, initial_train_latents,
                                          load_training_subjects, prior_loss, sample_points, seg_weights,
                                          soft_dice_loss)

__all__ = ["DEFAULT_PRESET", "HeldOutResult", "LatentFit", "LatentFitting", "NISF", "NISFConfig", "NISFField",
           "PRESETS", "PriorTraining", "RECIPE", "Rendering", "Subject", "annotated_frames", "build_network",
           "config_from_preset", "default_preset", "gather_rows", "initial_train_latents", "load_pair",
           "load_training_subjects", "mean_dice", "point_weights", "prior_loss", "sample_points", "seg_weights",
           "soft_dice_loss"]
