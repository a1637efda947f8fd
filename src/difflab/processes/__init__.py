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
from difflab.processes.continuous import VE, VPCosine, VPLinear, make_process, sde_coefficients
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
from difflab.processes.flow import Flow
from difflab.processes.gaussian import (
    DiscreteSchedule,
    GaussianProcess,
    constant_schedule,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    sigmoid_schedule,
)

__all__ = [
    "VE",
    "Flow",
    "DiscreteSchedule",
    "GaussianProcess",
    "VPCosine",
    "VPLinear",
    "constant_schedule",
    "cosine_schedule",
    "linear_schedule",
    "make_process",
    "make_schedule",
    "sde_coefficients",
    "sigmoid_schedule",
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
