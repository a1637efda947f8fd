"""A diffusers scheduler config in difflab's terms: the grid of noise levels, the timesteps the UNet is
given at each level, the starting noise scale and the x0 clipping of diffusers' own sampling loop.

difflab's samplers need nothing new to draw what diffusers draws from a folder: the scheduler's choices
are all a grid and a time mapping. ``timestep_spacing`` (leading, linspace, trailing), ``steps_offset``,
``set_alpha_to_one``/``final_alpha_cumprod``, Karras sigmas and the rest are read off diffusers' own
scheduler class after ``set_timesteps`` (so every option and every version of diffusers is followed
without restating its formulas), and become:

- ``sigmas``: the levels y = z / gammabar visits, in VE coordinates, ending at the final level (0, or
  the noise of alphabar_0 when ``set_alpha_to_one=False``);
- ``timesteps``: the value diffusers passes to the UNet at each level (floats for Euler and Heun);
- ``prior``: the std of the starting sample in VE coordinates (1 / gammabar_0 for the schedulers that
  start from z ~ N(0, I), ``init_noise_sigma`` for Euler and Heun);
- ``clip``/``threshold``: ``clip_sample`` and dynamic ``thresholding`` of x0, where that scheduler applies
  them (DDPM and DDIM; DPM-Solver++ thresholds only; Euler and Heun never clip).

One of diffusers' own loops is not a grid: DDIM with ``linspace`` spacing (or ``trailing`` with T not
a multiple of the steps) steps from timestep tau to tau - T // K but then evaluates the UNet at the next
listed timestep, reading its sample as one of that timestep's level. The plan's ``sigmas`` are then the
levels diffusers evaluates at, and DDIM's ``landing`` option says where each step really lands and how
diffusers' reading rescales it, so the images are diffusers' own. And DDIM with ``clip_sample``
renoises with the network's raw noise estimate next to the clipped x0, where difflab's DDIM uses the
noise implied by the clipped x0 (diffusers' ``use_clipped_model_output=True``).

A ``FlowMatchEulerDiscreteScheduler`` config (shift 1, no dynamic shifting) is difflab's flow process
(:func:`flow_process`) with the velocity target: its loop is difflab's Euler on diffusers' grid of t (from
t = 1, sigma_ve = inf), or DDIM's, the same steps; the UNet is given diffusers' timestep 1000 t, which is
difflab's network time.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from difflab.denoiser import Denoiser
from difflab.errors import UsageError
from difflab.processes.flow import Flow

# difflab sampler -> the diffusers scheduler whose loop it reproduces
SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                     "heun": "HeunDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler"}
# settings that make a scheduler class the named difflab sampler, whatever the folder's config says
FIXED = {"dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}}
CLIPPING = {"ddpm": ("clip", "threshold"), "ddim": ("clip", "threshold"), "dpmpp-2m": ("threshold",)}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_SAMPLERS = ("euler", "ddim")  # on the flow process DDIM (eta 0) is Euler step for step
# options of the flow scheduler that move its grid away from difflab's flow process (their neutral values)
_FLOW_NEUTRAL = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False,
                 "stochastic_sampling": False}


def is_flow(config: dict) -> bool:
    """Whether a scheduler config is diffusers' flow-matching Euler scheduler's."""
    return config.get("_class_name") == FLOW_SCHEDULER


def flow_process(config: dict) -> Flow:
    """The flow process of a FlowMatchEulerDiscreteScheduler config: t_min = 1 / num_train_timesteps, the
    bottom of its grid; a UsageError names an option difflab's flow process does not follow."""
    for key, neutral in _FLOW_NEUTRAL.items():
        if config.get(key) is not None and config[key] != neutral:
            raise UsageError(f"the folder's {FLOW_SCHEDULER} has {key}={config[key]!r}; difflab reads it with "
                             f"{key}={neutral!r} only")
    return Flow(t_min=1 / int(config.get("num_train_timesteps", 1000)))


@dataclass(frozen=True)
class SchedulerPlan:
    """What a diffusers scheduler loop of ``steps`` steps is in difflab's terms (module docstring)."""

    sampler: str
    sigmas: torch.Tensor  # float64 [K + 1], decreasing, VE noise levels ending at the final level
    timesteps: torch.Tensor  # float64 [K]: the UNet's timestep at each level but the last
    prior: float
    clip: float | None = None
    threshold: tuple[float, float] | None = None  # (quantile ratio, largest threshold)
    options: dict = field(default_factory=dict)  # sampler options (the DDPM variance, DDIM's landing)
    time_offset: int = 1  # difflab's network time minus diffusers' timestep (discrete steps: t = tau + 1)


def make_scheduler(config: dict, sampler: str, steps: int):
    """diffusers' scheduler for ``sampler`` built from a scheduler config (of any class: the keys that
    class does not take are dropped, as a diffusers user swapping schedulers gets), after set_timesteps."""
    if is_flow(config) and sampler not in FLOW_SAMPLERS:
        raise UsageError(f"a flow-matching folder samples with euler or ddim (the same steps) in diffusers' own "
                         f"grid; '{sampler}' has none (give --spacing for difflab's grids)")
    if sampler not in SCHEDULER_CLASSES:
        raise UsageError(f"a diffusers folder samples with {', '.join(SCHEDULER_CLASSES)} in diffusers' "
                         f"own grids; '{sampler}' has none (give --spacing for difflab's grids)")
    import diffusers

    cls = getattr(diffusers, FLOW_SCHEDULER if is_flow(config) else SCHEDULER_CLASSES[sampler])
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in config.items() if k in accepted}
    kwargs.update(FIXED.get(sampler, {}))
    try:
        sched = cls(**kwargs)
        sched.set_timesteps(steps)
    except Exception as e:  # diffusers' own checks raise any type (a folder's config is validated, not its every key)
        raise UsageError(f"diffusers' {cls.__name__} cannot run this config for {steps} steps: "
                         f"{(str(e).splitlines() or [e.__class__.__name__])[0][:200]}") from e
    return sched


def _ve(abar: torch.Tensor) -> torch.Tensor:
    """sigma_ve = sigmabar / gammabar = sqrt((1 - alphabar) / alphabar), in float64."""
    abar = abar.double()
    return torch.sqrt((1 - abar) / abar)


def scheduler_plan(config: dict, sampler: str, steps: int) -> SchedulerPlan:
    """The :class:`SchedulerPlan` of diffusers' ``sampler`` loop with ``steps`` steps for a scheduler
    config (a folder's ``scheduler_config.json``)."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    sched = make_scheduler(config, sampler, steps)
    c = sched.config
    taus = sched.timesteps.double()
    if is_flow(config):  # its sigmas are the flow's t; it starts from z_1 = s, held as y / sigma (std 1)
        t = sched.sigmas.double()
        return SchedulerPlan(sampler, t / (1 - t), taus, 1.0, time_offset=0)
    if sampler in ("ddpm", "ddim"):
        abar = sched.alphas_cumprod
        final = 1.0 if sampler == "ddpm" else float(sched.final_alpha_cumprod)
        prev = [int(sched.previous_timestep(int(t))) if sampler == "ddpm"
                else int(t) - c.num_train_timesteps // steps for t in taus]
        landing = _ve(torch.stack([abar[p].double() if p >= 0 else torch.tensor(final, dtype=torch.float64)
                                   for p in prev]))
        evaluated = _ve(abar[taus.long()])  # the level diffusers assumes its sample is at, step by step
        sigmas = torch.cat([evaluated, landing[-1:]])
        prior = math.sqrt(float(sigmas[0]) ** 2 + 1)  # z_T ~ N(0, I) is y = z / gammabar
        options = {"variance": "large" if c.variance_type in ("fixed_large", "fixed_large_log") else "small"} \
            if sampler == "ddpm" else {}
        if sampler == "ddim" and not torch.allclose(landing[:-1], evaluated[1:], rtol=1e-12, atol=0):
            options = {"landing": _off_grid(landing, sigmas)}
    else:
        s = sched.sigmas.double()
        if sampler == "heun":  # diffusers interleaves each level twice for the second evaluation
            s, taus = torch.cat([s[:1], s[1:-1:2], s[-1:]]), torch.cat([taus[:1], taus[1::2]])
        sigmas = s
        # Euler and Heun work in VE coordinates and scale the noise themselves; DPM-Solver starts at z ~ N(0, I)
        prior = float(sched.init_noise_sigma) if sampler != "dpmpp-2m" else math.sqrt(float(s[0]) ** 2 + 1)
        options = {}
    kinds = CLIPPING.get(sampler, ())
    clip = float(c.clip_sample_range) if "clip" in kinds and c.get("clip_sample") and not c.thresholding else None
    threshold = (float(c.dynamic_thresholding_ratio), float(c.sample_max_value)) \
        if "threshold" in kinds and c.get("thresholding") else None
    return SchedulerPlan(sampler, sigmas, taus, prior, clip, threshold, options)


def _off_grid(landing: torch.Tensor, sigmas: torch.Tensor) -> list[tuple[float, float]]:
    """DDIM's ``landing`` option for a loop off its grid: step i lands at VE level l_i, z = gammabar_l y,
    and the next step reads z as a sample of level sigma_{i+1}: y' = y gammabar(l_i) / gammabar(sigma_{i+1}),
    with gammabar = 1 / sqrt(1 + sigma^2) of the variance-preserving schedules diffusers' DDIM has."""
    nxt = sigmas[1:]
    scales = torch.sqrt((1 + nxt**2) / (1 + landing**2))
    return [(float(level), float(scale)) for level, scale in zip(landing, scales)]


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al.): per sample, s = the ``ratio`` quantile of |x0|,
    clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    flat = x0.float().flatten(1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return (torch.maximum(torch.minimum(x0.float(), s), -s) / s).to(x0.dtype)


class DiffusersDenoiser(Denoiser):
    """A :class:`~difflab.denoiser.Denoiser` of a diffusers UNet with its scheduler config. Without a plan
    it is a plain difflab denoiser (any sampler, any grid). With one (:meth:`planned`, a new denoiser for one
    draw: the plan is never left on a shared one) it is diffusers' loop: on the plan's levels the UNet gets
    the plan's timesteps, and x0 is clipped or thresholded as the scheduler does."""

    def __init__(self, net, process, prediction: str, scheduler_config: dict | None = None,
                 plan: SchedulerPlan | None = None):
        super().__init__(net, process, prediction)
        self.scheduler_config = dict(scheduler_config or {})
        self.plan = plan

    def plan_for(self, sampler: str, steps: int) -> SchedulerPlan:
        """The plan of diffusers' ``sampler`` loop of ``steps`` steps for this folder's scheduler config."""
        return scheduler_plan(self.scheduler_config, sampler, steps)

    def planned(self, plan: SchedulerPlan | None, net=None) -> DiffusersDenoiser:
        """This denoiser following ``plan`` (None: none), calling ``net`` (a wrapper of its network) if given."""
        return DiffusersDenoiser(self.net if net is None else net, self.process, self.prediction,
                                 self.scheduler_config, plan)

    def _net_time(self, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """difflab network time (diffusers' timestep + the plan's offset): the plan's timestep on its levels,
        else the process's (t for discrete steps, 1000 t for the flow process)."""
        t = t.double() if self.process.discrete else 1000 * t.double()
        if self.plan is None:
            return t
        levels, taus = self.plan.sigmas[:-1].to(sigma.device), self.plan.timesteps.to(sigma.device)
        rel = (sigma.double()[:, None] / levels[None, :] - 1).abs()
        rel = torch.where(torch.isinf(sigma)[:, None] & torch.isinf(levels)[None, :], 0.0, rel)  # (inf / inf)
        best, idx = rel.min(dim=1)
        # samplers pass the level in the sample's precision: float32 rounding is a 6e-8 relative error
        return torch.where(best < 1e-6, taus[idx] + self.plan.time_offset, t)

    def net_output(self, x, sigma, t, cond=None) -> torch.Tensor:
        p = next(self.net.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else x.dtype
        z = self.net_input(x, sigma, t).to(dtype)
        return self.net(z, self._net_time(sigma, t), **(cond or {})).to(x.dtype)

    def x0_from_output(self, x, sigma, t, out) -> torch.Tensor:
        x0 = super().x0_from_output(x, sigma, t, out)
        if self.plan is not None and self.plan.threshold is not None:
            return dynamic_threshold(x0, *self.plan.threshold)
        if self.plan is not None and self.plan.clip is not None:
            return x0.clamp(-self.plan.clip, self.plan.clip)
        return x0


def generate_like_diffusers(denoiser: DiffusersDenoiser, n: int, shape, *, sampler: str = "ddim",
                            steps: int = 50, plan: SchedulerPlan | None = None, **kwargs) -> torch.Tensor:
    """:func:`difflab.samplers.generate` on the grid, timesteps, starting scale and clipping of diffusers'
    ``sampler`` loop for the folder's scheduler config (``plan``, made here when not given; float samples,
    model units)."""
    from difflab.samplers import generate

    plan = plan if plan is not None else denoiser.plan_for(sampler, steps)
    return generate(denoiser.planned(plan), n, shape, sampler=sampler, steps=steps, sigmas=plan.sigmas,
                    prior=plan.prior, **{**plan.options, **kwargs})


def sample_folder(denoiser: DiffusersDenoiser, n: int, shape, *, sampler: str = "ddim", steps: int = 50,
                  spacing: str | None = None, label: int | torch.Tensor | None = None, device="cpu",
                  plan: SchedulerPlan | None = None, **kwargs) -> torch.Tensor:
    """Samples of a diffusers folder: diffusers' own grid for ``sampler`` (``plan``, made here when not
    given) unless a difflab ``spacing`` is asked for; ``label`` is the class of a class-conditional
    UNet2DModel (one for all, or one per sample)."""
    classes = getattr(denoiser.net, "num_classes", 0)
    labels = None if label is None else torch.as_tensor(label, device=device).long().expand(n)
    if labels is not None and not (classes and 0 <= int(labels.min()) and int(labels.max()) < classes):
        raise UsageError(f"--class must be in 0..{classes - 1} for this UNet2DModel" if classes else
                         "this UNet2DModel is unconditional: it takes no --class")
    cond_fn = None
    if labels is not None:
        cond_fn = lambda sl: {"class_labels": labels[sl]}  # noqa: E731
    if spacing is not None:
        from difflab.samplers import generate

        return generate(denoiser.planned(None), n, shape, sampler=sampler, steps=steps, spacing=spacing,
                        cond_fn=cond_fn, device=device, **kwargs)
    return generate_like_diffusers(denoiser, n, shape, sampler=sampler, steps=steps, cond_fn=cond_fn,
                                   device=device, plan=plan, **kwargs)
