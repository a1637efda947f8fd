"""difflab: diffusion models from naive pixel noise to guided text-to-image.

The package reads top-down in the order of the tutorial series:
part 1 naive diffusion (``processes.binomial``, ``processes.degradations``),
part 2 Gaussians (``gaussians``), part 3 DDPM (``processes.gaussian``),
part 4 DDIM and continuous time (``samplers``, ``processes.continuous``),
part 5 guidance (``guidance``).
"""

__version__ = "0.1.0"
