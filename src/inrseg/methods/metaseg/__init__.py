"""MetaSeg ("Fit Pixels, Get Labels"), split by phase.

* :mod:`~inrseg.methods.metaseg.config`: :class:`MetaSegConfig`, :data:`PRESETS`, :data:`RECIPE`;
* :mod:`~inrseg.methods.metaseg.inner`: losses, tasks and the differentiable inner loop (MAML);
* :mod:`~inrseg.methods.metaseg.fitting`: the test-time fit and the head on its features;
* :mod:`~inrseg.methods.metaseg.meta`: meta-training, an engine task;
* :mod:`~inrseg.methods.metaseg.phase2`: head retraining and the choice of ``T_f``;
* :mod:`~inrseg.methods.metaseg.segmenter`: :class:`MetaSeg`, the segmenter;
* :mod:`~inrseg.methods.metaseg.diagnostics`: the data of ``inrseg figures``.
"""

from inrseg.methods.metaseg.config import PAPER_SETTINGS, PRESETS, RECIPE, MetaSegConfig, default_preset
from inrseg.methods.metaseg.segmenter import MetaSeg

__all__ = ["PAPER_SETTINGS", "PRESETS", "RECIPE", "MetaSeg", "MetaSegConfig", "default_preset"]
