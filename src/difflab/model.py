"""A trained model in Python: sample, invert, interpolate, measure likelihoods and evaluate, with the
library functions the ``difflab`` commands call (``import difflab; model = difflab.load("runs/demo")``).

A model is a difflab run folder (``difflab train``) or a diffusers ``UNet2DModel`` folder (bare or a saved
pipeline, e.g. one written by ``difflab export``); both sample as ``difflab sample`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from difflab.checks import MAX_SAMPLES, MAX_SEED, check_device, check_flag, check_path, check_whole
from difflab.data import to_model as data_to_model
from difflab.errors import UsageError
from difflab.figures import to_uint8
from difflab.interop.folder_model import FolderModel
from difflab.noise import sample_seeds
from difflab.runs.draw import Run, drawing, load_run, sample_request
from difflab.runs.request import SampleRequest


def load(path: str | Path, device: str | torch.device = "cpu", *, ema_length: float | None = None) -> Model:
    """The model in ``path``: a run folder (its latest verified checkpoint, EMA weights; ``ema_length``:
    a post-hoc EMA) or a diffusers UNet2DModel folder."""
    p = Path(check_path("path", path))
    device = check_device(device, auto=False)
    if not _is_diffusers(p):
        return Model(load_run(p, device, ema_length=ema_length))  # (its errors say what a run folder needs)
    if ema_length is not None:
        raise UsageError(f"ema_length needs a difflab run folder; {path} is a diffusers folder")
    return Model(FolderModel.load(p, device))


def _is_diffusers(p: Path) -> bool:
    """A saved pipeline (unet/) or a bare UNet2DModel folder (its config.json names its class)."""
    if (p / "unet" / "config.json").exists():
        return True
    try:
        return "_class_name" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def to_pil(images: torch.Tensor) -> list:
    """uint8 [N, C, H, W] images as a list of PIL images (mode L or RGB)."""
    from difflab.figures import pil_image

    return [pil_image(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]


class Model:
    """A run or a diffusers folder, ready to sample (:meth:`sample`) and measure."""

    def __init__(self, source: Run | FolderModel) -> None:
        self.source = source

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) of its images."""
        return tuple(self.source.shape)

    @property
    def run(self) -> Run | None:
        """The difflab run (config, method, network), or None for a diffusers folder."""
        return self.source if isinstance(self.source, Run) else None

    def __repr__(self) -> str:
        kind = "run" if self.run is not None else "diffusers folder"
        return f"<difflab.Model {kind} {self.path} {list(self.shape)}>"

    def sample(self, n: int = 16, *, seed: int = 0, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, labels: int | Sequence[int] | torch.Tensor | None = None,
               prompt: str | None = None, pil: bool = False, **settings: Any) -> torch.Tensor | list:
        """n samples as uint8 [n, C, H, W] (``pil``: a list of PIL images), the same images as ``difflab sample``
        with the same settings; sample j depends only on (seed, j). ``settings``: the other fields of
        :class:`~difflab.runs.request.SampleRequest` (start, clip, eta, init_noise, classifier, precision, ...).
        Unset settings take the run's own (its sampler, step count, clipping and guidance scale)."""
        check_whole({"--n": (n, 1, MAX_SAMPLES), "--seed": (seed, 0, MAX_SEED),  # (the request's own names)
                     "--start": (settings.get("start", 0), 0, MAX_SEED)})
        check_flag("pil", pil)
        req = SampleRequest.of(run=self.path, n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                               labels=labels, prompt=prompt, **settings)
        images = sample_request(self.source, req)
        return to_pil(images) if pil else images

    def save_pretrained(self, path: str | Path, format: str = "run", *, license: str | None = None) -> Path:
        """Write the model to a new (or empty) folder ``path``, atomically, and return it: ``format="run"``, a
        clean copy of its run folder (config, the checkpoint of its weights, samples); ``"diffusers"``, the
        pipeline folder ``difflab export`` writes, its model card under ``license`` (default: the data set's,
        else unknown; a diffusers folder is copied). ``difflab.load(path)`` gives this model back."""
        from difflab.interop.export import save_model

        return save_model(self.source, check_path("path", path), format, license)

    # --- editing a given image (Gaussian runs) ---------------------------------------------------------
    def edit(self, images: torch.Tensor, *, strength: float | None = None, mask: torch.Tensor | None = None,
             seed: int = 0, sampler: str | None = None, steps: int | None = None, jump_length: int = 10,
             resample: int | None = None, labels: int | Sequence[int] | torch.Tensor | None = None, prompt: str | None = None,
             pil: bool = False, callback: Callable[[dict], None] | None = None, **settings: Any) -> torch.Tensor | list:
        """Edited uint8 images [N, C, H, W] of uint8 ``images`` [N, C, H, W] (this model's shape; ``pil``: a list
        of PIL images), drawn as :meth:`sample` draws with the same settings (the run's sampler, steps, guidance and
        clipping unless given; image j depends only on (seed, j)). Without ``mask``, SDEdit: the image noised to
        the level at ``strength`` of the sampler's grid (default 0.5) and denoised from there (1: a fresh sample,
        0: the image back). With ``mask`` (True, or white in a uint8 image: repaint; [H, W], [1 or C, H, W] or
        [N, 1 or C, H, W]), RePaint: the masked pixels drawn anew, the others kept, with ``resample`` passes over
        every ``jump_length`` steps (defaults: ``strength`` 1 and :data:`difflab.editing.REPAINT_DEFAULTS`, the
        ancestral sampler, 50 steps, 4 passes). ``settings``: the other fields of
        :class:`~difflab.runs.request.SampleRequest` (guidance, clip, eta, start, ...). ``callback(dict(i, sigma, x, x0))``
        after every sampler step of every batch (model units; RePaint's ``i`` counts within each pass). See
        :mod:`difflab.editing`."""
        from difflab.editing import REPAINT_DEFAULTS, edit_images

        _check_callable("callback", callback)
        if mask is not None:
            sampler = REPAINT_DEFAULTS["sampler"] if sampler is None else sampler
            steps = REPAINT_DEFAULTS["steps"] if steps is None and sampler == REPAINT_DEFAULTS["sampler"] else steps
            resample = REPAINT_DEFAULTS["resample"] if resample is None else resample
        resample = 1 if resample is None else resample
        run = self._edit_run()
        x = self._images(images, "edit")
        m = None if mask is None else edit_mask(mask, tuple(x.shape)).to(x.device)
        if "init_noise" in settings:
            raise UsageError("edit starts from the images: it takes no init_noise")
        req = run.prepare(SampleRequest.of(run=self.path, n=len(x), seed=seed, sampler=sampler, steps=steps,
                                           labels=labels, prompt=prompt, **settings))
        den, cond_fn, sigmas, options = run.editing(req)
        strength = (1.0 if m is not None else 0.5) if strength is None else strength
        out = edit_images(den, x, sigmas.to(device=x.device, dtype=x.dtype), sample_seeds(req.seed, len(x), req.start),
                          strength=strength, mask=m, sampler=req.sampler, cond_fn=cond_fn, batch_size=req.batch_size,
                          jump_length=jump_length, resample=resample, callback=callback, **options)
        images = to_uint8(out.cpu())
        return to_pil(images) if pil else images

    # --- the deterministic DDIM round trip (Gaussian models) ----------------------------------------
    def invert(self, images: torch.Tensor, *, steps: int = 100, spacing: str = "uniform", refine: int = 0,
               labels: torch.Tensor | Sequence[int] | None = None, batch_size: int = 64,
               stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """DDIM-invert uint8 images [N, C, H, W] (this model's shape) to latents, float32 [N, C, H, W] in
        standard-normal units: :meth:`decode` with the same ``steps``, ``spacing`` and ``labels`` gives the images
        back (both with the network alone: no guidance, no x0 clipping). Measured on digits test images, tiny
        runs: ``steps=20, refine=3`` within a mean error of 0.8/255 (at most 1/255; trained 2 steps) and
        0.5/255 (at most 3/255; 200 steps); plain inversion (``refine=0``) at 10 steps 20/255 and 14/255.
        ``sample(init_noise=latents, sampler="ddim", steps=steps)`` decodes them with the run's own guidance and
        clipping instead. ``labels``: the images' classes on conditional runs (default: the null condition;
        :meth:`image_labels` picks a dataset's own). ``stop()`` true raises
        :class:`~difflab.streaming.Cancelled` from the next network call (the page's stop button)."""
        check_whole({"steps": (steps, 1, 100_000), "refine": (refine, 0, 1000), "batch_size": (batch_size, 1, 1 << 16)})
        from difflab.latents import invert_images

        den = self._denoiser("invert", stop)
        x = self._images(images, "invert")
        latents, _ = invert_images(den, x, steps, self._condition(labels, len(x)), spacing=spacing, refine=refine,
                                   batch_size=_count(batch_size, "batch_size"), reconstruction=False)
        return latents

    def decode(self, latents: torch.Tensor, *, steps: int = 100, spacing: str = "uniform",
               labels: torch.Tensor | Sequence[int] | None = None, batch_size: int = 64,
               stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """The images (uint8 [N, C, H, W]) of latents from :meth:`invert`, by deterministic DDIM with the same
        settings: the network alone on the grid of ``steps`` and ``spacing``, each image under its ``labels``
        (default: the null condition). ``stop``: as in :meth:`invert`."""
        check_whole({"steps": (steps, 1, 100_000), "batch_size": (batch_size, 1, 1 << 16)})
        from difflab.latents import decode_latents

        den = self._denoiser("decode", stop)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.ndim != 4 or \
                tuple(latents.shape[1:]) != self.shape or len(latents) == 0 or not bool(latents.isfinite().all()):
            got = f"{latents.dtype} {list(latents.shape)}" if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise UsageError(f"decode takes finite float latents [N, {', '.join(map(str, self.shape))}] (from invert), "
                             f"got {got}")
        return decode_latents(den, latents.float(), _count(steps, "steps"), self._condition(labels, len(latents)),
                              spacing=spacing, batch_size=_count(batch_size, "batch_size"), device=self.source.device)

    def interpolate(self, a: int | torch.Tensor, b: int | torch.Tensor, n: int = 10, *, steps: int = 50,
                    spacing: str = "uniform", label: int | None = None, batch_size: int = 64,
                    on_images: Callable[[int, torch.Tensor], None] | None = None,
                    stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """n images (uint8 [n, C, H, W]) decoded by DDIM along the slerp between two latents: ``a`` and ``b``
        are two seeds (the starting noise of sample 0 of ``sample(seed=a)``) or two uint8 images [C, H, W],
        DDIM-inverted first. ``label``: the class on conditional runs (default: the null condition).
        ``on_images(first, images)`` is called as each batch of ``batch_size`` is decoded (the page shows them
        as they come); ``stop``: as in :meth:`invert`."""
        check_whole({"steps": (steps, 1, 100_000), "label": (label, 0, 1_000_000), "batch_size": (batch_size, 1, 1 << 16),
                     **{end: (v, 0, MAX_SEED) for end, v in (("a", a), ("b", b)) if not isinstance(v, torch.Tensor)}},
                    optional=("label",))
        from difflab.latents import decode_latents, invert, seed_latent, slerp_path

        if _count(n, "n") < 2:
            raise UsageError(f"n must be at least 2 (the two ends), got {n}")
        n = int(n)
        _check_callable("on_images", on_images)
        den = self._denoiser("interpolate", stop)
        labels = None if label is None else torch.full((n,), int(label), dtype=torch.long)
        cond = self._condition(labels, n)
        if isinstance(a, int) and isinstance(b, int):
            za, zb = (seed_latent(s, self.shape, self.source.device) for s in (a, b))
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            za, zb = invert(den, self._images(torch.stack([a, b]), "interpolate"), steps, cond(slice(0, 2)),
                            spacing=spacing)
        else:
            raise UsageError("interpolate between two seeds or two images")
        return decode_latents(den, slerp_path(za, zb, n), steps, cond, spacing=spacing, batch_size=batch_size,
                              on_batch=on_images)

    def likelihood(self, images: torch.Tensor, *, steps: int = 32, seed: int = 0, hutchinson_samples: int = 1,
                   probe: str = "rademacher", labels: torch.Tensor | Sequence[int] | None = None,
                   batch_size: int = 64, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Bits per dimension (float64 [N]) of uint8 images [N, C, H, W] by the probability-flow ODE, as
        ``difflab likelihood`` computes them (RK4 in log sigma, Hutchinson's trace estimator). ``progress(k)``
        is called with 0 once the arguments are checked, then with the count of each batch done."""
        check_whole({"steps": (steps, 1, 100_000), "seed": (seed, 0, MAX_SEED),
                     "hutchinson_samples": (hutchinson_samples, 1, 10_000), "batch_size": (batch_size, 1, 1 << 16)})
        from difflab.likelihood import bits_per_dim

        images = self._images(images, "likelihood", to_model=False)
        _check_callable("progress", progress)
        den, cond_fn = self._denoiser("likelihood"), self._condition(labels, len(images))
        if progress is not None:
            progress(0)
        return bits_per_dim(den, images, steps=steps, seed=seed, hutchinson_samples=hutchinson_samples, probe=probe,
                            cond_fn=cond_fn, batch_size=_count(batch_size, "batch_size"), device=self.source.device,
                            progress=progress)

    def image_labels(self, labels: torch.Tensor | None, class_names: Sequence[str] | None) -> torch.Tensor | None:
        """The ``labels`` argument for images labelled ``labels`` (of the classes ``class_names``, a dataset's):
        those labels where this model is conditioned on the same classes (a diffusers folder, which names
        none: on any), else None (the null condition)."""
        if labels is None or self.source.traits().conditioning == "none":
            return None
        return labels if self.run is None or list(class_names or ()) == list(self.run.class_names or ()) else None

    def evaluate(self, n: int = 1000, *, data: str | None = None, split: str = "test",
                 metrics: Sequence[str] = ("fid", "kid", "precision", "recall", "accuracy"),
                 features: str = "inception", **sampling: Any) -> dict:
        """FID, KID, precision/recall and (conditional runs) accuracy of ``n`` samples against ``data``
        (default: the run's dataset), as ``difflab evaluate`` reports them. ``sampling``: the settings of
        :meth:`sample` (seed, sampler, steps, guidance, ...)."""
        check_whole({"--n": (n, 1, MAX_SAMPLES)})
        from difflab.evaluate import evaluate_images
        from difflab.runs.data import reference_data

        name = data or (self.run.cfg.data if self.run is not None and self.run.cfg is not None else None)
        if name is None:
            raise UsageError("name the reference dataset with data=... (a diffusers folder has none of its own)")
        images, labels, _ = samples_for_evaluation(self.source, n, **sampling)
        metrics = [m for m in metrics if m != "accuracy" or labels is not None]
        return evaluate_images(images, labels, reference_data(name, split, self.shape), metrics, features,
                               device=self.source.device)

    # --- helpers ------------------------------------------------------------------------------------
    def _edit_run(self) -> Run:
        if self.run is None:
            raise UsageError(f"edit needs a difflab run folder; {self.path} is a diffusers folder")
        self._denoiser("edit")  # (a part-1 run has none: its error)
        return self.run

    def _denoiser(self, what: str, stop: Callable[[], bool] | None = None):
        """D(x, sigma) for the deterministic work (the network alone, no scheduler plan); with ``stop``, its
        network checks it before every call."""
        from difflab.streaming import WatchedNet

        _check_callable("stop", stop)
        den = self.source.ode_denoiser(None if stop is None else WatchedNet(self.source.net, stop))
        if den is None:  # the part-1 methods have no D(x, sigma), no ODE
            raise UsageError(f"{what} needs a Gaussian run (--method gaussian); {self.path} is a "
                             f"{self.run.method.name} run")
        return den

    def _images(self, images, what: str, to_model: bool = True) -> torch.Tensor:
        """uint8 images [N, C, H, W] of this model's shape, in model units ([-1, 1]) when ``to_model``."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or \
                tuple(images.shape[1:]) != self.shape or len(images) == 0:
            got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise UsageError(f"{what} takes uint8 images [N, {', '.join(map(str, self.shape))}], got {got}")
        return data_to_model(images, self.source.device) if to_model else images

    def _condition(self, labels, n: int) -> Callable[[slice], dict | None]:
        """cond_fn(slice) of n images: their classes (or the null condition) on conditional models."""
        t = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
        if t is not None and len(t) != n:
            raise UsageError(f"labels must hold one class per image ({n}), got {len(t)}")
        traits = self.source.traits()
        if t is not None and traits.conditioning == "none":
            raise UsageError("--class needs a run trained with --conditioning class|text")
        if t is not None and not (0 <= int(t.min()) and int(t.max()) < traits.num_classes):
            raise UsageError(f"--class must be in 0..{traits.num_classes - 1}")
        fn = model_condition(self.source, t, self.source.device)
        return fn if fn is not None else (lambda sl: None)


def samples_for_evaluation(source: Run | FolderModel, n: int, ctx=None, **sampling: Any):
    """(uint8 samples, their labels, the prepared request) of ``source`` for the metrics: conditional models
    draw the classes in turn (the labels the accuracy is judged by). With ``ctx`` (a ``DistContext``) the n
    are split over its ranks, and the ranks other than 0 get (None, None, request)."""
    d = drawing(source, SampleRequest.of(n=n, **sampling))
    req = d.request
    if ctx is None:
        return d.images(), req.label_tensor(), req
    images = d.sharded(ctx)
    ctx.shutdown()  # every rank holds all samples; rank 0 alone computes the metrics
    return (images, req.label_tensor(), req) if ctx.main else (None, None, req)


def model_condition(source: Run | FolderModel, labels: torch.Tensor | None, device) -> Callable | None:
    """cond_fn(slice) of images of classes ``labels`` (None: the null condition) under ``source``; None for
    an unconditional model."""
    if isinstance(source, FolderModel):
        return folder_condition(source.num_classes, labels, device)
    return run_condition(source.conditioner, labels, device)


def run_condition(conditioner, labels: torch.Tensor | None, device) -> Callable | None:
    """cond_fn(slice) of a run: each image's class, or the null condition without labels."""
    if conditioner.kind == "none":
        return None

    def cond(sl: slice):
        if labels is None:
            return conditioner.null(sl.stop - sl.start, device)
        return conditioner.for_labels(labels[sl], device)

    return cond


def folder_condition(classes: int, labels: torch.Tensor | None, device) -> Callable | None:
    """cond_fn(slice) of a diffusers UNet2DModel: a class-conditional one has no null class, so the images'
    own labels, which must fit it."""
    if not classes:
        return None
    if labels is None or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise UsageError(f"this UNet2DModel is class-conditional ({classes} classes, no null class): give --data "
                         f"images labelled 0..{classes - 1}")
    return lambda sl: {"class_labels": labels[sl].to(device)}


def edit_mask(mask, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """An edit mask as bool [N or 1, 1 or C, H, W] (True: repaint) for images of ``shape``: a bool tensor, a uint8
    image (white, >= 128: repaint) or floats in [0, 1] (>= 0.5: repaint), of shape [H, W], [1 or C, H, W] or
    [N or 1, 1 or C, H, W]."""
    n, c, h, w = shape
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, torch.uint8) and not mask.is_floating_point():
        got = f"{mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UsageError(f"the mask must be an image: a bool, uint8 or float tensor [H, W] (white: repaint), got {got}")
    m = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask.unsqueeze(0) if mask.ndim == 3 else mask
    if m.ndim != 4 or tuple(m.shape[2:]) != (h, w) or m.shape[0] not in (1, n) or m.shape[1] not in (1, c):
        raise UsageError(f"the mask has shape {list(mask.shape)}; the images are {w}x{h}: give a mask of {w}x{h} pixels "
                         f"([H, W], [1 or {c}, H, W] or [1 or {n}, 1 or {c}, H, W])")
    if m.dtype == torch.bool:
        return m
    if m.dtype == torch.uint8:
        return m >= 128
    if not bool(m.isfinite().all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise UsageError("a float mask must hold values in [0, 1] (1: repaint)")
    return m >= 0.5


def _check_callable(name: str, fn: object) -> None:
    if fn is not None and not callable(fn):
        raise UsageError(f"{name} must be a function or None, got {fn!r}"[:200])


def _count(value: int, name: str) -> int:
    from difflab.checks import check_range

    check_range(name, value, 1, 1 << 16)
    if value != int(value):
        raise UsageError(f"{name} must be a whole number, got {value}")
    return int(value)
