"""Sampling that shows its work as it goes: images as soon as they are finished, the denoising path
of one sample step by step, and a stop button (used by ``difflab serve``; as useful in a notebook).

>>> from difflab.runs.draw import load_run
>>> from difflab.streaming import stream_samples
>>> run = load_run("runs/demo")
>>> for first, images in stream_samples(run, 16, on_step=print, sampler="ddim", steps=10):
...     pass                                   # images: uint8 [k, C, H, W], samples first .. first + k - 1

Per-sample seeds make the images the same as one ``run.sample(16, ...)`` call, however they are
split into parts (Gaussian runs; part-1 methods draw their noise per call). The request is resolved once
(:func:`difflab.runs.draw.drawing`): the run's defaults apply as in ``difflab sample``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

from difflab.figures import to_uint8


class Cancelled(Exception):
    """Raised inside a network call once its stop flag is set: the sampling loop unwinds at once."""


class WatchedNet(nn.Module):
    """A network that checks ``stop()`` before every call (raising :class:`Cancelled`) and keeps the
    inputs it was called with since :meth:`take_input` was last called: the z_t each step denoised,
    in the network's own units (unit variance for VP processes), as ``difflab figures`` shows them."""

    def __init__(self, net: nn.Module, stop: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.net, self.stop = net, stop
        self._inputs: list[torch.Tensor] = []
        self._lock = threading.Lock()  # generate may call from several threads

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.stop is not None and self.stop():
            raise Cancelled("cancelled")
        with self._lock:
            self._inputs.append(x[:1].detach())
        return self.net(x, t, **cond)

    def take_input(self) -> torch.Tensor | None:
        """The first input (row 0) since the last take, or None; forgets the rest."""
        with self._lock:
            first = self._inputs[0] if self._inputs else None
            self._inputs.clear()
        return first


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, count) parts of n samples: the first alone (its path is shown while it is computed, and
    it is on screen soonest), the rest in parts of ``size``."""
    if n < 1:
        return []
    parts = [(0, 1)]
    parts += [(lo, min(size, n - lo)) for lo in range(1, n, size)]
    return parts


def stream_samples(model, n: int, *, start: int = 0, chunk: int = 4, on_step: Callable[[dict], None] | None = None,
                   stop: Callable[[], bool] | None = None, **settings) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(index, images)`` for samples ``start .. start + n - 1`` of ``model`` (a
    :class:`difflab.runs.draw.Run` or a diffusers folder's model) part by part: :func:`stream` of the request
    with the settings of :meth:`Run.sample` (seed, sampler, steps, guidance, labels, prompt, ...)."""
    from difflab.runs.draw import drawing
    from difflab.runs.request import SampleRequest

    return stream(drawing(model, SampleRequest.of(n=n, start=start, **settings)), chunk=chunk, on_step=on_step,
                  stop=stop)


def stream(d, *, chunk: int = 4, on_step: Callable[[dict], None] | None = None,
           stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(index, images)`` for the samples of ``d`` (a resolved :class:`difflab.runs.draw.Drawing`) part
    by part, uint8 [k, C, H, W] each, index counted from the request's ``start``: the same images as
    ``d.images()``.

    ``on_step(dict(i, steps, sigma, t, xt, x0))`` is called after every step of the first sample: ``xt``
    the network's input z_t and ``x0`` its prediction, uint8 [C, H, W]; ``sigma`` is the VE noise level
    (None for part-1 methods, which give their step ``t``, and at pure noise, the flow process's t = 1: JSON has
    no infinity). ``stop()`` true raises :class:`Cancelled`
    from the next network call.

    On a CPU every part runs with one torch thread, and the parts after the first run as many side by
    side as torch has threads (:func:`difflab.threads.run_split`): small batches spend most of a
    multi-threaded call waking threads, and on a shared, busy machine a batch of one took 12 times
    longer with two threads than with one (DDIM-10, mnist-small)."""
    from difflab import threads

    req = d.request
    if req.n < 1:
        return
    watched = WatchedNet(d.model.net, stop)

    def callback(info: dict) -> None:
        xt = watched.take_input()
        sigma = float(info["sigma"]) if "sigma" in info else None
        on_step({"i": int(info["i"]), "steps": req.steps, "sigma": sigma if sigma is None or math.isfinite(sigma) else None,
                 "t": None if info.get("t") is None else float(info["t"]),
                 "xt": to_uint8(xt[0].float().cpu()) if xt is not None else None,
                 "x0": to_uint8(info["x0"][:1].float().cpu())[0]})

    def part(lo: int, k: int, cb=None) -> torch.Tensor:
        return d.part(lo, k, callback=cb, net=watched)

    cpu = torch.device(d.model.device).type == "cpu"
    side_by_side = torch.get_num_threads() if cpu and req.prompt is None else 1  # prompt caches: one thread
    parts = chunks(req.n, chunk)
    with threads.one_torch_thread(cpu):
        yield 0, part(0, 1, callback if on_step is not None else None)
    rest = parts[1:]
    for g in range(0, len(rest), side_by_side):
        group = rest[g:g + side_by_side]
        if len(group) == 1 or not cpu:
            with threads.one_torch_thread(cpu):
                done = [part(*group[0])]
        else:
            done = threads.run_split(part, group)
        for (lo, _), images in zip(group, done):
            yield lo, images
