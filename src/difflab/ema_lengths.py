"""The lengths of EDM2's power-function EMA (Karras et al. 2024, sec. 3): the relative std sigma_rel of the
profile tau^gamma and its exponent gamma, and the checks of the lengths a run asks for.

Beneath the config (which checks ``--ema-length``/``--ema-track``) and :mod:`difflab.runs.ema` (which
averages with them).
"""

from __future__ import annotations

import math

import numpy as np

from difflab.errors import UsageError

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma = (sqrt 5 - 3) / 2 (the root of
# gamma^2 + 3 gamma + 1, where d log sigma_rel / d gamma = 0) and falls to 0 as gamma grows; lengths up
# to the maximum have a gamma on the decreasing branch, the one used (gamma > -0.382, so the square of
# every profile is integrable).
GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2


def sigma_rel_of_gamma(gamma: float) -> float:
    """Relative std of the power profile tau^gamma on [0, t]: sqrt(g + 1) / ((g + 2) sqrt(g + 3))."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_AT_MAX)  # 0.3003: no power profile is relatively wider
# the shortest length: gamma ~ 1 / sigma_rel = 1e6 keeps the cubic's coefficients (1 / sigma_rel^2 = 1e12) and
# the profiles' powers well inside float64 (below ~1e-154 the square underflows to 0); an EMA this short is
# the raw weights of any run under a million steps
SIGMA_REL_MIN = 1e-6


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of relative std ``sigma_rel``: squaring sigma_rel(gamma) gives the cubic
    gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0; its largest real root (the other two
    lie below -1 once s is below the maximum; near it, two roots merge and the real part is kept)."""
    check_ema_length(sigma_rel)
    k = 1 / sigma_rel**2
    return float(np.roots([1.0, 7.0, 16.0 - k, 12.0 - k]).real.max())


def check_ema_length(x: float, flag: str = "--ema-length") -> float:
    """``x`` if it is a representable relative EMA length, 1e-6 <= x < 0.3003, else a UsageError."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not SIGMA_REL_MIN <= x < SIGMA_REL_MAX:  # and NaN
        raise UsageError(f"{flag} must be a fraction of the run in [{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f}) (a "
                         f"power-function EMA's relative std; EDM2 uses 0.05 to 0.2), got {x!r}")
    return float(x)


def parse_lengths(text: str, flag: str = "--ema-track") -> list[float]:
    """Comma-separated relative EMA lengths ('' gives none), each checked."""
    try:
        lengths = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated fractions such as 0.05,0.1, got '{text}'") from None
    if len(set(lengths)) != len(lengths):
        raise UsageError(f"{flag} lists a length twice: '{text}'")
    return [check_ema_length(x, flag) for x in lengths]
