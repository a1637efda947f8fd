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
from pathlib import Path

import torch

from difflab.data import to_model
from difflab.errors import DataError
from difflab.figures import pil_image, to_uint8
from difflab.request import SampleRequest
from difflab.sampling import request_evaluations
from difflab.serve.catalog import Catalog
from difflab.serve.jobs import Job
from difflab.serve.requests import CompareRequest, ForwardRequest, InterpolateRequest, InvertRequest
from difflab.streaming import WatchedNet, chunks, stream_samples
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
        """The training data of run ``name`` (as trained: MNIST padded to 32), cached in memory."""
        from difflab.config import load_run_config
        from difflab.runs import load_data

        info = self.catalog.info(name)
        if info.data is None:
            raise DataError("this model has no training data to show (a diffusers folder)")
        with self._data_lock:
            if name not in self._data:
                self._data[name] = load_data(load_run_config(self.catalog.path(name)))
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
            run = self.catalog.model(req.run, req.precision)
            t0 = time.perf_counter()
            job.emit({"type": "start", "count": req.n, "first": req.start, "steps": req.steps,
                      "evaluations": request_evaluations(run, req), "checkpoint": run.step})

            def on_step(d: dict) -> None:
                job.emit({"type": "step", "index": req.start, "i": d["i"], "steps": req.steps, "sigma": d["sigma"],
                          "xt": png_url(d["xt"]) if d["xt"] is not None else None, "x0": png_url(d["x0"]),
                          "ms": 1000 * (time.perf_counter() - t0)})

            for lo, images in stream_samples(run, req.n, on_step=on_step, stop=job.cancelled, **req.sample_kwargs()):
                ms = 1000 * (time.perf_counter() - t0)
                for k, im in enumerate(images):
                    job.emit({"type": "image", "index": req.start + lo + k, "png": png_url(im), "ms": ms})

        return work

    def warm(self, name: str, precision: str = "fp32"):
        """Load a run and draw one one-step sample, so the first click does not pay for either."""
        def work(job: Job) -> None:
            run = self.catalog.model(name, precision)
            list(stream_samples(run, 1, steps=1, sampler="ddim",  # (part-1 methods have their own)
                                stop=job.cancelled))
            job.emit({"type": "loaded", "checkpoint": run.step})

        return work

    def compare(self, req: CompareRequest):
        def work(job: Job) -> None:
            job.emit({"type": "start", "columns": [{"sampler": c.sampler, "steps": c.steps,
                                                    "evaluations": c.evaluations()} for c in req.columns],
                      "count": req.columns[0].n})
            for ci, col in enumerate(req.columns):
                run = self.catalog.model(col.run, col.precision)
                t0 = time.perf_counter()
                for lo, images in stream_samples(run, col.n, stop=job.cancelled, **col.sample_kwargs()):
                    for k, im in enumerate(images):
                        job.emit({"type": "image", "column": ci, "index": lo + k, "png": png_url(im)})
                job.emit({"type": "column", "column": ci, "sampler": col.sampler, "steps": col.steps,
                          "evaluations": request_evaluations(run, col), "seconds": time.perf_counter() - t0})

        return work

    def _condition(self, run, label: int | None, n: int):
        if label is None:
            return run.conditioner.null(n, run.device)
        return run.conditioner.for_labels(torch.full((n,), label, dtype=torch.long), run.device)

    def interpolate(self, req: InterpolateRequest):
        from difflab.latents import reconstruct, slerp
        from difflab.noise import SeededNoise, sample_seeds

        def work(job: Job) -> None:
            run = self.catalog.model(req.run)
            den = run.method.denoiser(WatchedNet(run.net, job.cancelled))
            za, zb = (SeededNoise(sample_seeds(s, 1)).initial(run.shape, device=run.device) for s in (req.seed_a, req.seed_b))
            t = torch.linspace(0, 1, req.n, device=run.device)
            latents = slerp(za.expand(req.n, -1, -1, -1), zb.expand(req.n, -1, -1, -1), t)
            job.emit({"type": "start", "n": req.n, "t": t.tolist()})
            for lo, k in chunks(req.n, 4):
                x = reconstruct(den, latents[lo:lo + k], req.steps, self._condition(run, req.label, k))
                for j, im in enumerate(to_uint8(x.cpu())):
                    job.emit({"type": "image", "index": lo + j, "t": float(t[lo + j]), "png": png_url(im)})

        return work

    def invert(self, req: InvertRequest):
        from difflab.latents import invert, reconstruct, reconstruction_error

        def work(job: Job) -> None:
            run = self.catalog.model(req.run)
            label = None
            if req.image is not None:
                image = req.image
            else:
                image, label = self._image(req.run, req.index)
                label = label if run.conditioner.kind != "none" and run.class_names else None
            job.emit({"type": "start", "original": png_url(image)})
            den = run.method.denoiser(WatchedNet(run.net, job.cancelled))
            cond = self._condition(run, label, 1)
            x = to_model(image[None], run.device)
            latent = invert(den, x, req.steps, cond)
            # the latent is standard normal: +-3 fills the grey range
            job.emit({"type": "latent", "png": png_url((latent[0] / 3).cpu()),
                      "std": float(latent.std()), "mean": float(latent.mean())})
            recon = to_uint8(reconstruct(den, latent, req.steps, cond).cpu())
            mse, psnr = reconstruction_error(image[None], recon)
            job.emit({"type": "reconstruction", "png": png_url(recon[0]), "mse": mse,
                      "psnr": None if psnr == float("inf") else psnr, "steps": req.steps})

        return work

    # --- the training monitor ----------------------------------------------------------------------
    def monitor_state(self, name: str, rows_seen: int, grid_seen: str) -> dict:
        """New loss rows since ``rows_seen`` ([step, loss]), the evaluations among them ([step, "kid" or "fid",
        value]; --eval-every) and the newest sample grid if it is not ``grid_seen``."""
        info = self.catalog.info(name)
        path = self.catalog.path(name)
        rows, evals = [], []
        log = path / "loss.csv"
        if log.exists():
            with open(log, newline="") as f:
                for i, row in enumerate(csv.DictReader(f)):
                    if i >= rows_seen:
                        try:
                            step = int(row["step"])
                            rows.append([step, float(row["loss"])])
                        except (KeyError, TypeError, ValueError):
                            break  # a row being written right now: read it next time
                        evals += [[step, m, v] for m in EVAL_COLUMNS if (v := _number(row.get(m))) is not None]
        out = {"type": "monitor", "rows": rows, "evals": evals, "step": info.step, "training": info.training}
        grid = _newest_grid(path / "samples")
        if grid is not None:
            key = f"{grid.name}:{grid.stat().st_mtime_ns}"
            if key != grid_seen and grid.stat().st_size < 8 << 20:
                out["grid"] = {"key": key, "name": grid.name,
                               "png": "data:image/png;base64," + base64.b64encode(grid.read_bytes()).decode()}
        return out


def _number(text: str | None) -> float | None:
    """A finite number of a loss.csv cell; None for an empty or missing one (older logs have no evaluation
    columns) or a damaged one."""
    try:
        v = float(text or "nan")
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _newest_grid(folder: Path) -> Path | None:
    found = [p for p in folder.glob("*.png") if not p.name.startswith(".")] if folder.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)
