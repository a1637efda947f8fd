"""The work behind each panel of the page: jobs for the model work (sample, compare, interpolate,
invert), quick views for the rest (the forward process, dataset thumbnails, the training monitor).
Images leave as PNG data URLs, ready for an <img>."""

from __future__ import annotations

import base64
import csv
import io
import math
import threading
import time
from dataclasses import replace

import torch

from difflab.data import to_model
from difflab.errors import DataError
from difflab.figures import pil_image, to_uint8
from difflab.model import Model
from difflab.runs.draw import Drawing, drawing
from difflab.runs.request import SampleRequest
from difflab.serve.catalog import MAX_GRID, MAX_LOG, Catalog
from difflab.serve.jobs import Job
from difflab.serve.requests import (
    CompareRequest,
    EditRequest,
    FewStepRequest,
    ForwardRequest,
    InterpolateRequest,
    InvertRequest,
)
from difflab.streaming import Cancelled, WatchedNet, chunks, stream
from difflab.training.loggers import EVAL_COLUMNS


def png_url(image: torch.Tensor) -> str:
    """A uint8 [C, H, W] image (or model units) as a ``data:image/png;base64,...`` URL."""
    a = to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    pil_image(a).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Panels:
    """The panels' work over one :class:`Catalog`."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._data: dict[str, object] = {}
        self._data_lock = threading.Lock()

    # --- data --------------------------------------------------------------------------------------
    def dataset(self, name: str):
        """The training data of run ``name`` (as trained: MNIST padded to 32), cached in memory; only the
        run's own data (:meth:`Catalog.training_data` checks its fingerprint)."""
        info = self.catalog.info(name)
        if info.data is None:
            raise DataError("this model has no training data to show (a diffusers folder)")
        with self._data_lock:
            if name not in self._data:
                self._data[name] = self.catalog.training_data(name)
            return self._data[name]

    def thumbnails(self, name: str, start: int, n: int) -> dict:
        data = self.dataset(name)
        start = max(0, min(start, len(data) - 1))
        stop = min(len(data), start + max(1, min(n, 64)))
        labels = data.labels
        return {"total": len(data), "start": start, "images": [
            {"index": i, "png": png_url(data.images[i]),
             "label": None if labels is None or not data.class_names else data.class_names[int(labels[i])]}
            for i in range(start, stop)]}

    def _image(self, name: str, index: int) -> tuple[torch.Tensor, int | None]:
        data = self.dataset(name)
        if not 0 <= index < len(data):
            raise DataError(f"image index must be in 0..{len(data) - 1}, got {index}")
        label = None if data.labels is None else int(data.labels[index])
        return data.images[index], label

    # --- the forward process -----------------------------------------------------------------------
    def forward(self, req: ForwardRequest) -> dict:
        from difflab.forward import FORWARD_PROCESSES, forward_view

        image, _ = self._image(req.run, req.index)
        view = forward_view(req.process, to_model(image[None]), seed=req.seed)
        return {"process": req.process, "about": FORWARD_PROCESSES[req.process][1], "summary": view.summary,
                "t": view.t, "frames": [png_url(f) for f in view.frames], "curve": view.curve,
                "curve_label": view.curve_label, "log_scale": view.log_scale, "untouched": view.untouched}

    # --- jobs --------------------------------------------------------------------------------------
    def sample(self, req: SampleRequest):
        def work(job: Job) -> None:
            d = drawing(self.catalog.model(req.run, req.precision), req)  # the one path: the run's defaults
            t0 = time.perf_counter()
            job.emit({"type": "start", "count": d.request.n, "first": d.request.start, "steps": d.request.steps,
                      "evaluations": d.evaluations(), "checkpoint": d.model.step})

            def on_step(s: dict) -> None:
                job.emit({"type": "step", "index": d.request.start, "i": s["i"], "steps": s["steps"], "sigma": s["sigma"],
                          "xt": png_url(s["xt"]) if s["xt"] is not None else None, "x0": png_url(s["x0"]),
                          "ms": 1000 * (time.perf_counter() - t0)})

            for lo, images in stream(d, on_step=on_step, stop=job.cancelled):
                ms = 1000 * (time.perf_counter() - t0)
                for k, im in enumerate(images):
                    job.emit({"type": "image", "index": d.request.start + lo + k, "png": png_url(im), "ms": ms})

        return work

    def warm(self, name: str, precision: str = "fp32"):
        """Load a run and draw one one-step sample with its own sampler, so the first click does not pay for either."""
        def work(job: Job) -> None:
            model = self.catalog.model(name, precision)
            list(stream(drawing(model, SampleRequest(n=1, steps=1, precision=precision)), stop=job.cancelled))
            job.emit({"type": "loaded", "checkpoint": model.step})

        return work

    def compare(self, req: CompareRequest):
        def work(job: Job) -> None:
            columns = [drawing(self.catalog.model(col.run, col.precision), col) for col in req.columns]
            job.emit({"type": "start", "columns": [{"sampler": c.sampler, "steps": c.steps,
                                                    "evaluations": c.evaluations()} for c in req.columns],
                      "count": req.columns[0].n})
            for ci, d in enumerate(columns):
                t0 = time.perf_counter()
                for lo, images in stream(d, stop=job.cancelled):
                    for k, im in enumerate(images):
                        job.emit({"type": "image", "column": ci, "index": lo + k, "png": png_url(im)})
                job.emit({"type": "column", "column": ci, "sampler": d.request.sampler, "steps": d.request.steps,
                          "evaluations": d.evaluations(), "seconds": time.perf_counter() - t0})

        return work

    def interpolate(self, req: InterpolateRequest):
        """:meth:`Model.interpolate <difflab.model.Model.interpolate>` of the request, image by image as they come."""
        def work(job: Job) -> None:
            model = Model(self.catalog.model(req.run))
            t = torch.linspace(0, 1, req.n).tolist()
            job.emit({"type": "start", "n": req.n, "t": t})

            def show(first: int, images: torch.Tensor) -> None:
                for j, im in enumerate(images):
                    job.emit({"type": "image", "index": first + j, "t": t[first + j], "png": png_url(im)})

            # (4 images a batch: each batch is shown as soon as it is decoded)
            model.interpolate(req.seed_a, req.seed_b, req.n, steps=req.steps, label=req.label, batch_size=4,
                              on_images=show, stop=job.cancelled)

        return work

    def invert(self, req: InvertRequest):
        """:meth:`Model.invert <difflab.model.Model.invert>` of one image, then its
        :meth:`~difflab.model.Model.decode` with the same settings."""
        from difflab.latents import reconstruction_error

        def work(job: Job) -> None:
            model = Model(self.catalog.model(req.run))
            labels = None
            if req.image is not None:
                image = req.image
            else:
                image, label = self._image(req.run, req.index)  # (the run's own data: its own classes)
                labels = None if label is None else model.image_labels(torch.tensor([label]), model.source.class_names)
            job.emit({"type": "start", "original": png_url(image)})
            latent = model.invert(image[None], steps=req.steps, spacing=req.spacing, refine=req.refine, labels=labels,
                                  stop=job.cancelled)
            # the latent is standard normal: +-3 fills the grey range
            job.emit({"type": "latent", "png": png_url(latent[0] / 3), "std": float(latent.std()),
                      "mean": float(latent.mean())})
            recon = model.decode(latent, steps=req.steps, spacing=req.spacing, labels=labels, stop=job.cancelled)
            mse, psnr = reconstruction_error(image[None], recon)
            job.emit({"type": "reconstruction", "png": png_url(recon[0]), "mse": mse,
                      "psnr": None if psnr == float("inf") else psnr, "steps": req.steps, "spacing": req.spacing,
                      "refine": req.refine})

        return work

    # --- the training monitor ----------------------------------------------------------------------
    def monitor_state(self, name: str, rows_seen: int, grid_seen: str) -> dict:
        """New loss rows since ``rows_seen`` ([step, loss]), the evaluations among them ([step, "kid" or "fid",
        value]; --eval-every) and the newest sample grid if it is not ``grid_seen``."""
        info = self.catalog.info(name)
        rows, evals = [], []
        log = self.catalog.read_file(name, "loss.csv", MAX_LOG)  # only a regular file inside the run
        try:
            for i, row in enumerate(csv.DictReader(io.StringIO((log or b"").decode(errors="replace"), newline=""))):
                if i >= rows_seen:
                    try:
                        step = int(row["step"])
                        rows.append([step, float(row["loss"])])
                    except (KeyError, TypeError, ValueError):
                        break  # a row being written right now: read it next time
                    evals += [[step, m, v] for m in EVAL_COLUMNS if (v := _number(row.get(m))) is not None]
        except csv.Error:
            pass  # a damaged log (a field over csv's limit): the rows before the damage are shown
        out = {"type": "monitor", "rows": rows, "evals": evals, "step": info.step, "training": info.training}
        grid = self.catalog.newest_grid(name)
        if grid is not None and grid[1] != grid_seen:
            png = self.catalog.read_file(name, f"samples/{grid[0]}", MAX_GRID)
            if png is not None:
                out["grid"] = {"key": grid[1], "name": grid[0],
                               "png": "data:image/png;base64," + base64.b64encode(png).decode()}
        return out

    # --- editing and few-step drawing ----------------------------------------------------------------
    def edit(self, req: EditRequest):
        """SDEdit or RePaint of one image by :meth:`difflab.Model.edit`: the edits stream in parts (the first
        alone, its path shown step by step), each part the same images as one call for all of them."""
        from difflab.editing import start_index

        def work(job: Job) -> None:
            model = Model(self.catalog.model(req.run))
            image = req.image if req.image is not None else self._image(req.run, req.index)[0]
            # SDEdit runs the last steps of the grid; RePaint's jumps back make its own count (the path shows it)
            total = None if req.mask is not None else req.steps - start_index(req.steps, req.strength)
            job.emit({"type": "start", "original": png_url(image), "count": req.n, "first": req.start, "steps": total,
                      "method": "repaint" if req.mask is not None else "sdedit", "checkpoint": model.source.step,
                      "mask": None if req.mask is None else png_url(req.mask[None].to(torch.uint8) * 255)})
            t0, frames = time.perf_counter(), [0]

            def stop(info: dict) -> None:
                if job.cancelled():
                    raise Cancelled("cancelled")

            def on_step(info: dict) -> None:  # the first edit: its state after each step, at unit variance, and its x0
                stop(info)
                sigma = float(info["sigma"])
                finite = math.isfinite(sigma)
                job.emit({"type": "step", "index": req.start, "i": frames[0], "steps": total, "sigma": sigma if finite else None,
                          "xt": png_url(info["x"][0].float().cpu() / math.sqrt(1 + sigma**2)) if finite else None,
                          "x0": png_url(info["x0"][0].float().cpu()), "ms": 1000 * (time.perf_counter() - t0)})
                frames[0] += 1

            images = image[None].expand(req.n, -1, -1, -1)
            for lo, k in chunks(req.n, 4):
                out = model.edit(images[lo:lo + k], strength=req.strength, mask=req.mask, seed=req.seed, start=req.start + lo,
                                 sampler=req.sampler, steps=req.steps, guidance=req.guidance, labels=req.label,
                                 prompt=req.prompt, jump_length=req.jump_length, resample=req.resample,
                                 callback=on_step if lo == 0 else stop)
                ms = 1000 * (time.perf_counter() - t0)
                for j, im in enumerate(out):
                    job.emit({"type": "image", "index": req.start + lo + j, "png": png_url(im), "ms": ms})

        return work

    def fewstep(self, req: FewStepRequest):
        """The same seeds within each budget of network evaluations, one row per sampler, each cell drawn by the one
        drawing path at the most steps its budget allows (a cell no step count fits says what it needs)."""
        def work(job: Job) -> None:
            model = self.catalog.model(req.base.run, req.base.precision)
            rows = [_within_budgets(model, replace(req.base, sampler=s), req.budgets) for s in req.samplers]
            job.emit({"type": "start", "count": req.base.n, "budgets": list(req.budgets),
                      "rows": [next((d.request.sampler for d, _ in row if d is not None), s) for s, row in zip(req.samplers, rows)]})
            for r, row in enumerate(rows):
                drawn: dict[int, tuple[int, list[str]]] = {}  # steps -> (the cell that drew them, its images)
                for c, (d, least) in enumerate(row):
                    cell = {"type": "cell", "row": r, "column": c, "budget": req.budgets[c]}
                    if d is None:
                        job.emit({**cell, "needs": least})
                        continue
                    cell.update(sampler=d.request.sampler, steps=d.request.steps, evaluations=d.evaluations())
                    if d.request.steps in drawn:  # a larger budget that fits no more steps: the same images
                        first, pngs = drawn[d.request.steps]
                        job.emit({**cell, "same_as": first, "images": pngs})
                        continue
                    t0 = time.perf_counter()  # one call, as `difflab sample` draws (part-1 methods seed per call)
                    pngs = [png_url(im) for im in d.images(net=WatchedNet(d.model.net, job.cancelled))]
                    drawn[d.request.steps] = (c, pngs)
                    job.emit({**cell, "seconds": time.perf_counter() - t0, "images": pngs})

        return work


def _within_budgets(model, request: SampleRequest, budgets) -> list[tuple[Drawing | None, int]]:
    """For each of ``budgets``: (the drawing of ``request`` at the most steps whose network evaluations per sample
    fit in it, or None when one step does not fit; the evaluations of one step)."""
    fitting: list[Drawing] = []
    for steps in range(1, max(budgets) + 1):  # evaluations grow with the steps, by at least one a step
        d = drawing(model, replace(request, steps=steps))
        if steps == 1:
            least = d.evaluations()
        if d.evaluations() > max(budgets):
            break
        fitting.append(d)
    return [(next((d for d in reversed(fitting) if d.evaluations() <= b), None), least) for b in budgets]


def _number(text: str | None) -> float | None:
    """A finite number of a loss.csv cell; None for an empty or missing one (older logs have no evaluation
    columns) or a damaged one."""
    try:
        v = float(text or "nan")
    except ValueError:
        return None
    return v if math.isfinite(v) else None
