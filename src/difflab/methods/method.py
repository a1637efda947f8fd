"""What the trainer trains: a method turns a batch into a loss, and a trained network into samples.

- :class:`GaussianMethod`: parts 3 to 5, discrete (DDPM) or continuous time, any parameterisation.
- :class:`ConsistencyMethod`: a Gaussian run consistency-tuned to draw in 1 or 2 steps (``difflab distill``).
- :class:`Naive1Method`, :class:`Naive2Method`, :class:`ColdMethod`: part 1.

Randomness is a pure function of (run seed, step, sample position in the global batch), so a
resumed run and a run on any number of ranks see the same noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch

from difflab import naive
from difflab.config import TrainConfig, process_config  # (process_config: imported from here too)
from difflab.data.imagedata import to_model
from difflab.denoiser import Denoiser
from difflab.errors import UsageError
from difflab.methods.classification import CLASSIFIER_METHODS
from difflab.methods.consistency import SIGMA_MID, Tuning, ect_loss, tuning_levels
from difflab.methods.noise_levels import training_times
from difflab.methods.weighting import loss_weight, weighted_mse
from difflab.noise import seeded_normal, seeded_uniform
from difflab.processes.binomial import BinomialNoise, PixelNoise
from difflab.processes.chains import degradation_chain, gaussian_chain, pixel_chain
from difflab.processes.continuous import make_process
from difflab.processes.degradations import get_degradation
from difflab.processes.gaussian import DiscreteSchedule, GaussianProcess
from difflab.recipe import ABOVE_GRID_BOTTOM, above_grid_bottom, guide_apg, guide_interval, guide_keep_mean
from difflab.samplers import SAMPLERS, SIGMA_TOP

if TYPE_CHECKING:
    from difflab.data import ImageData


@runtime_checkable
class Method(Protocol):
    """What the trainer trains and the samplers draw from; every caller uses only this, never the method's
    name (which is for messages): a question a caller would ask the name is a member here."""

    name: ClassVar[str]
    preset: ClassVar[str | None]  # the network of ``--model auto`` (None: the device and data choose)
    per_sample_seeds: ClassVar[bool]  # sample j depends only on (seed, j), whatever the batch boundaries
    conditional: ClassVar[bool]  # takes class labels, prompts and guidance
    predicts_previous_step: ClassVar[bool]  # the network predicts z_{t-1} (not an estimate of x0)
    samples_from_data: ClassVar[bool]  # sampling starts from dataset images (given by :meth:`prepare`)
    draws_samples: ClassVar[bool]  # the trained network draws images (False: a classifier, no sample grids)
    denoises: ClassVar[bool]  # has a denoiser D(x, sigma) (:meth:`denoiser`): the ODE, inversion, likelihood, export
    samplers: ClassVar[tuple[str, ...]]  # the samplers of :data:`difflab.samplers.SAMPLERS` it draws with (none: its own)

    def denoiser(self, net) -> Denoiser | None:
        """The denoiser D(x, sigma) of a network trained by this method, or None (part 1, the classifiers)."""

    def sampling_defaults(self, grid_bottom: float | None = None) -> dict:
        """What a run of this method samples with unless told (its config's settings, the fields of a
        :class:`~difflab.runs.request.SampleRequest`, each a valid value); empty for a method without a config.
        ``grid_bottom``: the run's measured sigma_min, for the settings that follow it."""

    def prepare(self, data: ImageData) -> None:
        """Check the settings against the run's data (before anything is written) and keep what
        sampling needs of it."""

    def describe(self, data: ImageData) -> str:
        """The method's part of the run's description line."""

    def network(self, data: ImageData) -> dict | None:
        """The network config this method trains (None: the diffusion network of ``--model``)."""

    def batch_index(self, step: int) -> int:
        """Which global batch of the data order ``step`` trains on."""

    def loss(self, net, x: torch.Tensor, cond: dict | None, step: int, seeds: torch.Tensor) -> torch.Tensor:
        """The scalar training loss of batch ``x`` (in [-1, 1]) at ``step``."""

    def sample(self, net, n: int, shape, *, seed: int = 0, start: int = 0, steps: int = 50,
               batch_size: int = 256, device="cpu", callback=None, **options) -> torch.Tensor:
        """n samples (floats in [-1, 1], on the CPU for batch-seeded methods) of the samples
        ``start .. start + n - 1`` of ``seed``."""

    def noising_chain(self, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
        """The forward process on clean images x: [K, B, C, H, W], x first; ``columns`` states, or every
        step of a chain that has no states between its steps: the chain of its process family
        (:mod:`difflab.processes.chains`), as the page's forward panel shows it."""

    def trajectories(self) -> dict[str, dict]:
        """The sampling trajectories the figures draw: file-name suffix -> sampling options."""

    @classmethod
    def forward_name(cls, cfg: TrainConfig) -> str | None:
        """The name of a run's own forward process as the page's forward panel lists it
        (:data:`difflab.forward.FORWARD_PROCESSES`), or None where the run has none there."""


def _generator(seed: int, step: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


class GaussianMethod:
    """Gaussian diffusion: z_t = gammabar_t x + sigmabar_t s; the network regresses the target of its
    parameterisation (the noise s for ``eps``: Ho et al.'s simple loss)."""

    name = "gaussian"
    preset = None
    per_sample_seeds = True
    conditional = True
    predicts_previous_step = False
    samples_from_data = False
    draws_samples = True
    denoises = True
    samplers = tuple(SAMPLERS)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.process: GaussianProcess = make_process(process_config(cfg))
        self.prediction = cfg.prediction

    @classmethod
    def forward_name(cls, cfg: TrainConfig) -> str | None:
        return cfg.process  # (constant-gamma runs: the panel's two constants are not the run's gamma)

    @classmethod
    def of(cls, process: GaussianProcess, prediction: str) -> GaussianMethod:
        """The method of a network trained elsewhere (a diffusers folder), for sampling only."""
        method = cls.__new__(cls)
        method.cfg, method.process, method.prediction = None, process, prediction
        return method

    def prepare(self, data: ImageData) -> None:
        pass

    def network(self, data: ImageData) -> None:
        return None

    def describe(self, data: ImageData | None = None) -> str:
        p = self.process
        head = p.describe() if isinstance(p, DiscreteSchedule) else f"continuous {p.config()['kind']} process"
        return f"{head}; the network predicts {self.prediction}"

    def batch_index(self, step: int) -> int:
        return step

    def denoiser(self, net) -> Denoiser:
        return Denoiser(net, self.process, self.prediction)

    def sampling_defaults(self, grid_bottom: float | None = None) -> dict:
        """The run's sampler, step count, x0 clipping, grid bottom, guidance interval, APG and mean-free guidance
        (config.json). An interval that starts above the grid's bottom starts above ``cfg.sample_sigma_min``, or
        for ``auto`` above ``grid_bottom`` (the run's measured one; 1, the bottom it had before, when unknown)."""
        if self.cfg is None:  # a network trained elsewhere: its model's own defaults apply
            return {}
        cfg = self.cfg
        bottom = {} if cfg.sample_sigma_min == "auto" else {"sigma_min": cfg.sample_sigma_min}  # auto: the run measures it
        apg = {} if guide_apg(cfg) is None else {"apg_eta": guide_apg(cfg)}
        mean = {"guide_keep_mean": True} if guide_keep_mean(cfg) else {}
        lo, hi = guide_interval(cfg)
        if lo == ABOVE_GRID_BOTTOM:
            lo = above_grid_bottom(bottom.get("sigma_min", grid_bottom))
        return {"sampler": cfg.sampler, "steps": cfg.sample_steps, "clip": cfg.clip, **bottom,
                "guide_sigmas": (lo, hi), **apg, **mean}

    def loss(self, net, x: torch.Tensor, cond: dict | None, step: int, seeds: torch.Tensor) -> torch.Tensor:
        den = self.denoiser(net)
        p, dev = self.process, x.device
        cfg = self.cfg
        t = training_times(p, seeded_uniform(seeds, step, (), dev), cfg.noise_sampling, cfg.logit_mean, cfg.logit_std,
                           cfg.time_shift)
        noise = seeded_normal(seeds, step, x.shape[1:], dev)
        z_prev = None
        if self.cfg.prediction == "zprev":  # the series' version 1: z_{t-1}, then one step to z_t
            z_prev = p.marginal(x, t - 1, seeded_normal(seeds, step + (1 << 30), x.shape[1:], dev))
            z = p.step(z_prev, t.long(), noise)
            sigma = p.sigma_ve(t.double())
            y = z / p.signal_scale(t).to(x.dtype).view(-1, 1, 1, 1)
        else:
            sigma = p.sigma_ve(t.double())
            y = x + sigma.to(x.dtype).view(-1, 1, 1, 1) * noise
        inp = den.net_input(y, sigma, t).to(x.dtype)
        out = net(inp, p.net_time(t), **(cond or {}))
        target = den.target(x, noise, t, z_prev).to(torch.float32)
        return weighted_mse(out, target, loss_weight(self.cfg.loss_weighting, den, sigma, t, self.cfg.min_snr_gamma))

    @torch.no_grad()
    def sample(self, net, n: int, shape, *, seed: int = 0, start: int = 0, steps: int = 50, batch_size: int = 256,
               device="cpu", callback=None, sampler: str | None = None, wrap: Callable | None = None,
               **options) -> torch.Tensor:
        """``wrap(denoiser)`` adds guidance and clipping around the method's denoiser; ``options`` go to
        :func:`difflab.samplers.generate` (cond_fn, init_noise, progress, sampler options)."""
        from difflab.samplers import generate

        den = self.denoiser(net)
        return generate(wrap(den) if wrap is not None else den, n, shape, seed=seed, sampler=sampler or "ddim",
                        steps=steps, batch_size=batch_size, device=device, start=start, callback=callback, **options)

    def noising_chain(self, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
        return gaussian_chain(self.process, x, columns, generator)[1]

    def trajectories(self) -> dict[str, dict]:
        return {"-ddpm": {"sampler": "ddpm"}, "-ddim": {"sampler": "ddim"}}


class ConsistencyMethod(GaussianMethod):
    """A Gaussian run consistency-tuned by ECT (:mod:`difflab.methods.consistency`, ``difflab distill``): the
    run's network in its parameterisation, read as a consistency function f(x, sigma) and drawn with the
    multistep consistency sampler in ``sample_steps`` (1 or 2) evaluations, the intermediate level being the
    grid bottom ``sample_sigma_min``. Not an ODE denoiser: no other sampler, inversion or likelihood."""

    name = "consistency"
    conditional = False
    denoises = False
    samplers = ()

    def __init__(self, cfg: TrainConfig, tuning: Tuning | None = None, network: dict | None = None):
        super().__init__(cfg)
        self.tuning, self._network = tuning or Tuning(), network

    def consistency_function(self, net) -> Denoiser:
        """f(x, sigma): the run's denoiser, whose x0 estimate the tuning makes a trajectory's end."""
        return Denoiser(net, self.process, self.prediction)

    def denoiser(self, net) -> None:
        return None  # its x0 estimate is a trajectory's end, not the posterior mean an ODE solver needs

    def sampling_defaults(self, grid_bottom: float | None = None) -> dict:
        """The run's step count, intermediate level and x0 clipping."""
        bottom = self.cfg.sample_sigma_min
        return {"steps": self.cfg.sample_steps, "clip": self.cfg.clip,
                **({} if bottom == "auto" else {"sigma_min": float(bottom)})}

    def describe(self, data: ImageData | None = None) -> str:
        t = self.tuning
        return (f"{super().describe(data)}; consistency tuning (ECT): log t ~ N({t.p_mean:g}, {t.p_std:g}^2), the gap "
                f"t - r divided by {t.q:g} every {t.stage_steps} steps")

    def network(self, data: ImageData) -> dict | None:
        return self._network  # the tuned run's network (None: the one its config builds)

    def loss(self, net, x: torch.Tensor, cond: dict | None, step: int, seeds: torch.Tensor) -> torch.Tensor:
        lo, hi = max(self.process.sigma_min(), 1e-3), min(self.process.sigma_max(), SIGMA_TOP)
        t, r = tuning_levels(self.tuning, seeded_uniform(seeds, step, (), x.device, salt=0xEC7), step, lo, hi)
        noise = seeded_normal(seeds, step, x.shape[1:], x.device)
        return ect_loss(self.consistency_function(net), x, t, r, noise, cond, self.tuning.huber_c)

    @torch.no_grad()
    def sample(self, net, n: int, shape, *, seed: int = 0, start: int = 0, steps: int = 2, batch_size: int = 256,
               device="cpu", callback=None, sampler: str | None = None, wrap: Callable | None = None,
               sigma_min: float | None = None, **options) -> torch.Tensor:
        """``steps`` levels of the consistency sampler from the top of the grid down to ``sigma_min`` (the
        intermediate level of 2 steps), one evaluation each; ``wrap`` adds the x0 clipping."""
        from difflab.samplers import generate

        if sampler not in (None, "consistency"):
            raise UsageError(f"a consistency-tuned run draws with its own sampler, not {sampler}; leave --sampler out")
        unknown = sorted(set(options) - {"cond_fn", "init_noise", "progress"})
        if unknown:
            raise UsageError(f"a consistency-tuned run takes no {unknown[0]} (its settings: --steps, --sigma-min)")
        f = self.consistency_function(net)
        return generate(wrap(f) if wrap is not None else f, n, shape, seed=seed, sampler="consistency", steps=steps,
                        batch_size=batch_size, device=device, start=start, callback=callback,
                        sigma_min=SIGMA_MID if sigma_min is None else sigma_min, **options)

    def trajectories(self) -> dict[str, dict]:
        return {"-1-step": {"steps": 1}, "-2-step": {"steps": 2}}


class _BatchSeeded:
    """Part 1's methods: noise drawn per batch (one generator each), so a sample depends on its batch;
    unconditional; the network sees the series' inputs directly."""

    preset: ClassVar[str | None] = "series-alg2"
    per_sample_seeds = False
    conditional = False
    predicts_previous_step = False
    samples_from_data = False
    draws_samples = True
    denoises = False
    samplers = ()

    def prepare(self, data: ImageData) -> None:
        pass

    def network(self, data: ImageData) -> None:
        return None

    def denoiser(self, net) -> None:
        return None  # the series' networks predict a step or an image, with no noise level to denoise at

    def sampling_defaults(self, grid_bottom: float | None = None) -> dict:
        """The run's step count, and its x0 clipping (which its own algorithm does not use)."""
        return {"steps": self.cfg.sample_steps, "clip": self.cfg.clip}

    @torch.no_grad()
    def sample(self, net, n: int, shape, *, seed: int = 0, start: int = 0, steps: int = 50, batch_size: int = 256,
               device="cpu", callback=None, **options) -> torch.Tensor:
        out = []
        for lo in range(0, n, batch_size):
            m = min(batch_size, n - lo)
            out.append(self.sample_batch(net, m, shape, seed=seed * 1_000_003 + start + lo, steps=steps,
                                         device=device, callback=callback, **options).cpu())
        return torch.cat(out)

    def trajectories(self) -> dict[str, dict]:
        return {"": {}}

    @classmethod
    def forward_name(cls, cfg: TrainConfig) -> str | None:
        return None  # (part 1's binomial chains: which of the panel's is the run's is not in its config)


class Naive1Method(_BatchSeeded):
    """Algorithm 1: predict the previous step of the binomial chain; the chain is walked in order,
    one gradient step per noising step (batch b serves T consecutive steps)."""

    name = "naive1"
    preset = "series-alg1"
    predicts_previous_step = True

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.noise = BinomialNoise(cfg.k, cfg.T, replace=cfg.replace)

    def prepare(self, data: ImageData) -> None:
        self.noise.check(data.height, data.width)  # impossible (k, T) settings fail before anything is written

    def describe(self, data: ImageData | None = None) -> str:
        return self.noise.summary(data.height, data.width) if data is not None else self.noise.summary(32, 32)

    def batch_index(self, step: int) -> int:
        return naive.naive1_position(step, self.cfg.T)[0]

    def loss(self, net, x, cond, step, seeds):
        b, t = naive.naive1_position(step, self.cfg.T)
        z_prev, z_t = naive.naive1_pair(x, t, self.noise, self.cfg.seed, b)
        return naive.naive1_loss(net, z_prev, z_t, t, self.cfg.T)

    def noising_chain(self, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
        return self.noise.chain(x, generator)  # every step (the figures pick ``columns`` of them)

    def sample_batch(self, net, n, shape, *, seed=0, steps=None, device="cpu", callback=None, **_):
        return naive.naive1_sample(net, (n, *shape), self.cfg.T, _generator(seed, 0, "cpu"),
                                   callback=callback, device=device)


class Naive2Method(_BatchSeeded):
    """Algorithm 2: pixel noise one pixel at a time (T = h*w), predict the clean image; sample by
    denoise-then-renoise in S steps (optionally with the cold-diffusion update)."""

    name = "naive2"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def describe(self, data: ImageData | None = None) -> str:
        return "algorithm 2: pixel noise without replacement (T = h*w), predict x"

    def batch_index(self, step: int) -> int:
        return step

    def loss(self, net, x, cond, step, seeds):
        return naive.naive2_loss(net, x, _generator(self.cfg.seed, step, "cpu"), PixelNoise(*x.shape[-2:]))

    def noising_chain(self, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
        return pixel_chain(x, columns, generator)[1]

    def sampling_defaults(self, grid_bottom: float | None = None) -> dict:
        """Also the run's own naive2 settings: the cold-diffusion update and the noise level it is told."""
        return {**super().sampling_defaults(grid_bottom), "cold_update": self.cfg.cold_update, "told_noise": self.cfg.told_noise}

    def trajectories(self) -> dict[str, dict]:
        told = {"told_noise": self.cfg.told_noise}  # both updates, with the noise level the run samples with
        return {"": {"cold_update": False, **told}, "-cold-update": {"cold_update": True, **told}}

    def sample_batch(self, net, n, shape, *, seed=0, steps=64, device="cpu", callback=None, cold_update=False,
                     told_noise=1.0, **_):
        T = shape[-2] * shape[-1]
        if not 1 <= steps <= T:
            raise UsageError(f"naive2 samples in 1 to T = h*w = {T} steps on {shape[-2]}x{shape[-1]} images, "
                             f"got --steps {steps}")
        return naive.naive2_sample(net, (n, *shape), steps, _generator(seed, 0, "cpu"),
                                   cold_update=cold_update, told_noise=told_noise, callback=callback, device=device)


class ColdMethod(_BatchSeeded):
    """Cold diffusion: any degradation D(x, t), the network restores x (L1 loss)."""

    name = "cold"
    samples_from_data = True

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.degradation = get_degradation(cfg.degradation)
        self.reference: torch.Tensor | None = None  # dataset images for priors that need them

    def prepare(self, data: ImageData) -> None:
        self.reference = to_model(data.read(range(min(512, len(data)))))  # the prior degrades dataset images

    def describe(self, data: ImageData | None = None) -> str:
        return f"cold diffusion with degradation {self.degradation!r}"

    @classmethod
    def forward_name(cls, cfg: TrainConfig) -> str | None:
        return cfg.degradation

    def batch_index(self, step: int) -> int:
        return step

    def loss(self, net, x, cond, step, seeds):
        return naive.cold_loss(net, x, self.degradation, _generator(self.cfg.seed, step, "cpu"))

    def noising_chain(self, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
        return degradation_chain(self.degradation, x, columns, generator)[1]

    def sample_batch(self, net, n, shape, *, seed=0, steps=50, device="cpu", callback=None, improved=True, **_):
        if steps < 1:
            raise UsageError(f"cold diffusion samples in at least 1 step, got --steps {steps}")
        g = _generator(seed, 0, "cpu")
        if self.reference is not None:
            idx = torch.randint(0, len(self.reference), (n,), generator=g)
            x_ref = self.reference[idx].to(device)
        else:
            x_ref = torch.zeros(n, *shape, device=device)
        x_T, state = naive.cold_prior(self.degradation, x_ref, g)
        return naive.cold_sample(net, x_T, self.degradation, steps, state, improved=improved, callback=callback)


METHOD_CLASSES = {"gaussian": GaussianMethod, "consistency": ConsistencyMethod, "naive1": Naive1Method,
                  "naive2": Naive2Method, "cold": ColdMethod,
                  **CLASSIFIER_METHODS}


def method_class(name: str) -> type[Method]:
    """The class of method ``name`` (a run's ``config.json`` ``method``): what it does, asked without a
    config or a network (``method_class(cfg.method).denoises``)."""
    if name not in METHOD_CLASSES:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[name]


def make_method(cfg: TrainConfig) -> Method:
    return method_class(cfg.method)(cfg)
