"""Sampling that shows its work as it goes: images as soon as they are finished, the denoising path
of one sample step by step, and a stop button (used by ``difflab serve``; as useful in a notebook).

>>> from difflab.sampling import load_run
>>> from difflab.streaming import stream_samples
>>> run = load_run("runs/demo")
>>> for first, images in stream_samples(run, 16, on_step=print, sampler="ddim", steps=10):
...     pass                                   # images: uint8 [k, C, H, W], samples first .. first + k - 1

Per-sample seeds make the images the same as one ``run.sample(16, ...)`` call, however they are
split into parts (Gaussian runs; part-1 methods draw their noise per call).
"""

from __future__ import annotations

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


def stream_samples(run, n: int, *, start: int = 0, chunk: int = 4, on_step: Callable[[dict], None] | None = None,
                   stop: Callable[[], bool] | None = None, labels: torch.Tensor | None = None,
                   **kwargs) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(index, images)`` for samples ``start .. start + n - 1`` of ``run`` (a
    :class:`difflab.sampling.Run`) part by part, uint8 [k, C, H, W] each, index counted from ``start``.

    ``on_step(dict(i, steps, sigma, t, xt, x0))`` is called after every step of the first sample: ``xt``
    the network's input z_t and ``x0`` its prediction, uint8 [C, H, W]; ``sigma`` is the VE noise level
    (None for part-1 methods, which give their step ``t``). ``stop()`` true raises :class:`Cancelled`
    from the next network call. ``labels`` ([n] class indices) and ``kwargs`` are those of
    :meth:`Run.sample` (seed, sampler, steps, guidance, prompt, ...).

    On a CPU every part runs with one torch thread, and the parts after the first run as many side by
    side as torch has threads (:func:`difflab.threads.run_split`): small batches spend most of a
    multi-threaded call waking threads, and on a shared, busy machine a batch of one took 12 times
    longer with two threads than with one (DDIM-10, mnist-small)."""
    from difflab import threads
    from difflab.sampling import sample_images

    if n < 1:
        return
    watched = WatchedNet(run.net, stop)
    kwargs = {**run.sampling_defaults(), **kwargs}  # the same images as run.sample
    kwargs["guide"] = run.guide_net(kwargs.get("autoguidance"))
    steps = kwargs.get("steps")

    def callback(d: dict) -> None:
        xt = watched.take_input()
        on_step({"i": int(d["i"]), "steps": steps, "sigma": float(d["sigma"]) if "sigma" in d else None,
                 "t": None if d.get("t") is None else float(d["t"]),
                 "xt": to_uint8(xt[0].float().cpu()) if xt is not None else None,
                 "x0": to_uint8(d["x0"][:1].float().cpu())[0]})

    def part(lo: int, k: int, cb=None) -> torch.Tensor:
        return sample_images(run.method, watched, run.conditioner, k, run.shape, start=start + lo,
                             labels=None if labels is None else labels[lo:lo + k], callback=cb,
                             device=run.device, **kwargs)

    cpu = torch.device(run.device).type == "cpu"
    side_by_side = torch.get_num_threads() if cpu and kwargs.get("prompt") is None else 1  # prompt caches: one thread
    parts = chunks(n, chunk)
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
