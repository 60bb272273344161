"""inrseg: medical image segmentation with implicit neural representations.

Methods: MetaSeg (meta-learned SIREN + head), NISF (Gabor auto-decoder), MORSE (stochastic
experts + implicit rendering) and the supervised baselines they are measured against.
"""

__version__ = "0.1.0"
