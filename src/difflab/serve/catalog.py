"""The runs the explorer offers: every run folder (and diffusers UNet folder) directly under the runs
folder, chosen by name only (a client never sends a path). Runs still training are sampled from
their latest checkpoint: a model is loaded again when a newer checkpoint appears."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.conditioning import Conditioner
from difflab.errors import CheckpointError, UsageError
from difflab.recipe import CLASSIFIERS
from difflab.request import ModelTraits
from difflab.training.checkpoint import list_checkpoints

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TRAINING_WINDOW_S = 120.0  # a run whose loss log changed this recently counts as training


@dataclass(frozen=True)
class RunInfo:
    """What the page needs to know about a run, read from its JSON files (no weights loaded)."""

    name: str
    kind: str  # "run" (difflab train) or "diffusers"
    method: str  # gaussian, naive1, naive2, cold
    conditioning: str  # none, class, text
    class_names: tuple[str, ...]
    shape: tuple[int, int, int]
    step: int
    training: bool
    data: str | None
    max_steps: int  # the largest sampler step count (T of discrete processes)
    sample_steps: int

    def traits(self) -> ModelTraits:
        """What a sampling request is checked against (:meth:`difflab.request.SampleRequest.resolve`)."""
        return ModelTraits(self.method, self.method == "gaussian", self.conditioning, len(self.class_names),
                           self.shape, classifier_guidance=False)  # the page has no classifier to send

    def to_json(self) -> dict:
        from difflab.samplers import SAMPLERS

        return {"name": self.name, "kind": self.kind, "method": self.method, "conditioning": self.conditioning,
                "class_names": list(self.class_names), "shape": list(self.shape), "step": self.step,
                "training": self.training, "data": self.data, "max_steps": self.max_steps,
                "sample_steps": self.sample_steps,
                "samplers": list(SAMPLERS) if self.method == "gaussian" else []}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name} in {path.parent.name} is unreadable ({type(e).__name__})") from e


def _run_info(name: str, path: Path) -> RunInfo:
    from difflab.config import load_run_config

    cfg = load_run_config(path)
    found = list_checkpoints(path / "checkpoints")
    meta = _json(found[-1]) if found else {}
    shape = tuple(meta.get("image_shape") or (0, 0, 0))
    log = path / "loss.csv"
    training = log.exists() and time.time() - log.stat().st_mtime < TRAINING_WINDOW_S
    max_steps = cfg.T if cfg.method == "gaussian" and cfg.process in ("linear", "cosine", "sigmoid", "constant") \
        else 1000
    return RunInfo(name, "run", cfg.method, cfg.conditioning, tuple(meta.get("class_names") or ()), shape,
                   int(meta.get("step", 0)), training, cfg.data, max_steps, cfg.sample_steps)


def _diffusers_info(name: str, path: Path) -> RunInfo:
    unet = path if (path / "config.json").exists() else path / "unet"
    cfg = _json(unet / "config.json")
    size = cfg.get("sample_size", 0)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    sched = path / "scheduler_config.json" if unet == path else path / "scheduler" / "scheduler_config.json"
    T = int(_json(sched).get("num_train_timesteps", 1000)) if sched.exists() else 1000
    return RunInfo(name, "diffusers", "gaussian", "none", (), (int(cfg.get("in_channels", 3)), h, w), 0, False,
                   None, T, 50)


def _kind(path: Path) -> str | None:
    """"run", "diffusers" or None for a folder that is neither (a classifier's run draws no images)."""
    if (path / "config.json").exists() and (path / "checkpoints").is_dir():
        try:
            method = json.loads((path / "config.json").read_text()).get("method")
        except (OSError, ValueError, AttributeError):
            method = None  # a damaged run is listed, and its entry says what is wrong
        return None if method in CLASSIFIERS else "run"
    for unet in (path, path / "unet"):
        if (unet / "config.json").exists() and (unet / "diffusion_pytorch_model.safetensors").exists():
            return "diffusers"
    return None


class Catalog:
    """Runs under ``root`` by name, and their loaded models (cached per name, precision and step)."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"--runs {root} is not a folder")
        self.device = torch.device(device)
        self._models: dict[tuple[str, str], tuple[int, object]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Folder names of the runs, sorted (the runs folder itself counts when it is a run)."""
        found = [p.name for p in sorted(self.root.iterdir()) if p.is_dir() and NAME.match(p.name) and _kind(p)]
        return found or ([self.root.name] if _kind(self.root) else [])

    def path(self, name: str) -> Path:
        """The folder of run ``name``; UsageError for anything that is not a listed name."""
        if not isinstance(name, str) or not NAME.match(name) or name not in self.names():
            raise UsageError(f"unknown run {name!r}; choose one of: {', '.join(self.names()) or '(none)'}")
        sub = self.root / name
        return sub if sub.is_dir() and _kind(sub) else self.root

    def info(self, name: str) -> RunInfo:
        path = self.path(name)
        return _run_info(name, path) if _kind(path) == "run" else _diffusers_info(name, path)

    def infos(self) -> list[dict]:
        out = []
        for name in self.names():
            try:
                out.append(self.info(name).to_json())
            except UsageError as e:
                out.append({"name": name, "error": str(e)})
        return out

    def model(self, name: str, precision: str = "fp32"):
        """The loaded run (a :class:`difflab.sampling.Run`), loaded again when it has a newer checkpoint."""
        info = self.info(name)
        key = (name, precision)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached[0] == info.step:
                return cached[1]
            model = self._load(self.path(name), info)
            if precision == "bf16":
                model.speed_up(bf16=True)
            self._models[key] = (info.step, model)
            return model

    def _load(self, path: Path, info: RunInfo):
        from difflab.sampling import Run, load_run

        if info.kind == "run":
            for attempt in range(2):  # a checkpoint may be pruned between listing and reading
                try:
                    return load_run(path, self.device)
                except CheckpointError:
                    if attempt:
                        raise
        from difflab.interop import load_diffusers_unet

        den, shape = load_diffusers_unet(path, self.device)
        from difflab.training.methods import GaussianMethod

        return Run(path, None, GaussianMethod.of(den.process, den.prediction), den.net, Conditioner("none"),
                   shape, None, 0, self.device)
