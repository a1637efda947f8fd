"""Processes that destroy images: part 1's binomial noise and degradations (here), part 3's
discrete Gaussian schedules (``processes.gaussian``) and part 4's continuous VP/VE processes
(``processes.continuous``)."""

from difflab.processes.binomial import (
    BinomialNoise,
    NoiseSettingsError,
    PixelNoise,
    PixelNoiseState,
    random_bits,
)
from difflab.processes.degradations import (
    DEGRADATIONS,
    Blur,
    Degradation,
    FadeToBlack,
    FadeToColour,
    Mask,
    Pixelate,
    get_degradation,
)

__all__ = [
    "DEGRADATIONS",
    "BinomialNoise",
    "Blur",
    "Degradation",
    "FadeToBlack",
    "FadeToColour",
    "Mask",
    "NoiseSettingsError",
    "PixelNoise",
    "PixelNoiseState",
    "Pixelate",
    "get_degradation",
    "random_bits",
]
