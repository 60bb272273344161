"""nnU-Net v2 as an inrseg method (``nnunet:2d``, ``nnunet:3d_fullres``, CPU plans ``*-cpu``).

nnU-Net's own pipeline - dataset fingerprint, experiment planning, preprocessing, its
augmentation, loss, poly schedule and sliding-window prediction with mirroring - run through
its Python API on inrseg's split, inside inrseg's wall-time budget, and scored by inrseg's
metrics like every other method. Needs the optional extra ``pip install 'inrseg[nnunet]'``
(``nnunetv2`` with ``torchvision==0.28.*`` beside ``torch==2.13``); nothing else in inrseg
imports it.
"""

from inrseg.methods.nnunet.config import PRESETS, RECIPE, NNUNetConfig
from inrseg.methods.nnunet.segmenter import NNUNet

__all__ = ["NNUNet", "NNUNetConfig", "PRESETS", "RECIPE"]
