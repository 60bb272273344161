"""MORSE: implicit anatomical rendering with stochastic experts (You et al., MICCAI 2023), and its
ablation variants, on the shared CNN trainer."""

from inrseg.methods.morse.config import (EXPERT_DROPOUT, HEAD_PRESETS, RECIPE, VARIANTS, MorseConfig,
                                             build_config, morse_config)
from inrseg.methods.morse.losses import dropout_ramp, morse_losses, rend_weight
from inrseg.methods.morse.segmenter import MORSE

__all__ = ["EXPERT_DROPOUT", "HEAD_PRESETS", "MORSE", "RECIPE", "VARIANTS", "MorseConfig", "build_config",
           "dropout_ramp", "morse_config", "morse_losses", "rend_weight"]
