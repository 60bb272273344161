"""U-Net and SegResNet: MONAI's networks on the shared CNN patch trainer (:mod:`inrseg.methods.cnn`)."""

from inrseg.methods.unet.config import PRESETS, SEGRESNET_RECIPE, UNET_RECIPE, UNetConfig, build_config
from inrseg.methods.unet.segmenter import SegResNetSegmenter, UNetSegmenter

__all__ = ["PRESETS", "SEGRESNET_RECIPE", "UNET_RECIPE", "SegResNetSegmenter", "UNetConfig", "UNetSegmenter",
           "build_config"]
