"""The runs the explorer offers: every run folder (and diffusers UNet folder) directly under the runs
folder, chosen by name only (a client never sends a path). Runs still training are sampled from
their latest checkpoint: a model is loaded again when a newer checkpoint appears.

The runs folder is untrusted (a run copied from elsewhere, a shared disk). A run folder that is a link
is not listed; a file is read only when it is a regular file inside its run folder (a link is followed
only while it stays inside; a FIFO or device is refused without opening it blocking) and no larger
than its limit; a run's training data is shown only when it is the data the run recorded the
fingerprint of. A run that cannot be read is listed as damaged, with the reason, beside the others.
What the listing reads is cached per folder and read again only when a path it came from changes
(its ``lstat``), so listing thousands of runs costs a few ``stat`` calls each."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflab.errors import CheckpointError, DataError, UsageError
from difflab.methods.method import method_class
from difflab.recipe import CLASSIFIERS
from difflab.runs.checkpoint import _check_meta, list_checkpoints
from difflab.runs.request import ModelTraits

if TYPE_CHECKING:
    from difflab.config import TrainConfig
    from difflab.data import ImageData

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TRAINING_WINDOW_S = 120.0  # a run whose loss log changed this recently counts as training
MAX_JSON = 4 << 20  # a config or checkpoint JSON (a real one is a few kB)
MAX_GRID = 8 << 20  # a sample grid sent to the monitor
MAX_LOG = 64 << 20  # loss.csv (a million steps logged is about 30 MB)
MAX_DATA_ENTRIES = 300_000  # files and folders a data folder may hold before it is refused unread
MAX_SIDE, MAX_CHANNELS, MAX_T = 4096, 16, 1_000_000
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


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
    data_fingerprint: str | None = None  # of the training data, as the newest checkpoint recorded it
    sampler: str | None = None  # what the run samples with unless told (None: its method's or scheduler's own)
    guidance: float = 1.0  # the run's own guidance scale (class and text runs)
    forward_process: str | None = None  # the forward panel's name of the run's own process (None: none there)

    def traits(self) -> ModelTraits:
        """What a sampling request is checked against (:meth:`difflab.runs.request.SampleRequest.resolve`)."""
        return ModelTraits(self.method, method_class(self.method).conditional, self.conditioning, len(self.class_names),
                           self.shape, classifier_guidance=False)  # the page has no classifier to send

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "method": self.method, "conditioning": self.conditioning,
                "class_names": list(self.class_names), "shape": list(self.shape), "step": self.step,
                "training": self.training, "data": self.data, "max_steps": self.max_steps,
                "sample_steps": self.sample_steps,
                "samplers": list(method_class(self.method).samplers), "sampler": self.sampler, "guidance": self.guidance,
                "forward_process": self.forward_process}


# --- reading an untrusted folder ---------------------------------------------------------------------
def _signature(path: str) -> tuple | None:
    """What changes when ``path`` (or, for a link, its target) is replaced, written or touched."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    sig: tuple = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        try:
            t = os.stat(path)
            sig += (os.path.realpath(path), t.st_mode, t.st_ino, t.st_size, t.st_mtime_ns)
        except OSError:
            sig += (None,)
    return sig


class FolderReader:
    """Reads inside one folder that may hold anything: every path looked at is recorded with its
    signature (:attr:`seen`, the cache's key; each path is looked at once, so a reader sees one state),
    links are followed only while they stay inside, and only regular files are read, up to a size
    limit. Anything else is a one-line CheckpointError."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.real = os.path.realpath(folder)
        self.seen: dict[str, tuple | None] = {str(folder): _signature(str(folder))}
        self._parsed: dict[str, object] = {}

    def signature(self, rel: str) -> tuple | None:
        """The ``lstat`` signature of ``rel`` (mode, inode, size, mtime_ns; a link's target too), recorded."""
        path = os.path.join(self.folder, rel)
        if path not in self.seen:
            self.seen[path] = _signature(path)
        return self.seen[path]

    def lexists(self, rel: str) -> bool:
        """Whether anything (a link too) is at ``rel``."""
        return self.signature(rel) is not None

    def _where(self, rel: str) -> str:
        """The path of ``rel`` with links resolved; CheckpointError when that lies outside the folder."""
        parts = rel.split("/")
        on_the_way = [self.signature("/".join(parts[:i])) for i in range(1, len(parts) + 1)]
        if not any(sig is not None and stat.S_ISLNK(sig[0]) for sig in on_the_way):
            return os.path.join(self.real, rel)  # no link on the way: inside by construction
        real = os.path.realpath(os.path.join(self.folder, rel))
        if os.path.commonpath([real, self.real]) != self.real:
            raise CheckpointError(f"{rel} in {self.folder.name} links outside it; the explorer reads nothing there")
        return real

    def stat(self, rel: str) -> os.stat_result | None:
        """The stat of ``rel`` (None when nothing is there), a link followed only to a path inside the folder."""
        if self.signature(rel) is None:
            return None
        try:
            return os.stat(self._where(rel))
        except OSError as e:
            raise CheckpointError(f"{rel} in {self.folder.name} cannot be read ({e.strerror or e})") from e

    def is_dir(self, rel: str) -> bool:
        st = self.stat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def regular(self, rel: str, limit: int | None = None) -> os.stat_result:
        """The stat of regular file ``rel`` (at most ``limit`` bytes); CheckpointError for anything else."""
        st = self.stat(rel)
        if st is None:
            raise CheckpointError(f"{self.folder.name} has no {rel}")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{rel} in {self.folder.name} is not a regular file")
        if limit is not None and st.st_size > limit:
            raise CheckpointError(f"{rel} in {self.folder.name} is {st.st_size / 2**20:.1f} MiB; "
                                  f"the explorer reads at most {limit / 2**20:g} MiB")
        return st

    def read(self, rel: str, limit: int) -> bytes:
        """The bytes of regular file ``rel``, at most ``limit`` of them."""
        self.regular(rel, limit)
        try:  # O_NONBLOCK: a FIFO swapped in since the check opens at once instead of waiting for a writer
            fd = os.open(self._where(rel), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"{rel} in {self.folder.name} cannot be read ({e.strerror or e})") from e
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CheckpointError(f"{rel} in {self.folder.name} is not a regular file")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"{rel} in {self.folder.name} is over {limit / 2**20:g} MiB")
        return data

    def json(self, rel: str, limit: int = MAX_JSON) -> object:
        """``rel`` parsed as JSON (once per reader)."""
        if rel not in self._parsed:
            try:
                self._parsed[rel] = json.loads(self.read(rel, limit))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise CheckpointError(f"{rel} in {self.folder.name} is not valid JSON ({type(e).__name__})") from e
        return self._parsed[rel]


def _config(files: FolderReader) -> TrainConfig:
    """The run's config.json, read as :func:`difflab.config.load_run_config` does but through ``files``."""
    from difflab.config import TrainConfig

    raw = files.json("config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {files.folder.name} is damaged (not a JSON object)")
    try:
        return TrainConfig.from_json(raw).validate()
    except (TypeError, ValueError, UsageError) as e:
        raise CheckpointError(f"config.json in {files.folder.name} is damaged ({e})") from e


def _shape(value: object, where: str) -> tuple[int, int, int]:
    ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value)
    if not ok or not (1 <= value[0] <= MAX_CHANNELS and 1 <= min(value[1:]) and max(value[1:]) <= MAX_SIDE):
        raise CheckpointError(f"{where} is damaged (image_shape {str(value)[:40]} is not [channels, height, width])")
    return tuple(value)


def _run_info(name: str, files: FolderReader) -> tuple[RunInfo, TrainConfig]:
    cfg = _config(files)
    if not files.is_dir("checkpoints"):
        raise CheckpointError(f"checkpoints in {name} is not a folder")
    found = list_checkpoints(files.folder / "checkpoints")
    meta: dict = {}
    if found:
        rel = f"checkpoints/{found[-1].name}"
        meta = files.json(rel)  # type: ignore[assignment]
        _check_meta(found[-1], meta)
        files.regular(f"checkpoints/{meta['tensors']}")
        where = f"checkpoint {rel} of {name}"
        names = meta.get("class_names") or []
        if not all(isinstance(c, str) for c in names):
            raise CheckpointError(f"{where} is damaged (class_names are not all text)")
        shape = _shape(meta.get("image_shape"), where)
    else:
        shape, names = (0, 0, 0), []
    if cfg.conditioning == "text" and files.lexists("prompts.safetensors"):
        files.regular("prompts.safetensors")
    max_steps = cfg.T if method_class(cfg.method).denoises and cfg.process in ("linear", "cosine", "sigmoid", "constant") \
        else 1000
    info = RunInfo(name, "run", cfg.method, cfg.conditioning, tuple(names), shape, int(meta.get("step", 0)), False,
                   cfg.data, max_steps, cfg.sample_steps, meta.get("data_fingerprint"),
                   cfg.sampler if method_class(cfg.method).samplers else None,
                   cfg.guidance if cfg.conditioning != "none" else 1.0, _forward_process(cfg))
    return info, cfg


def _forward_process(cfg: TrainConfig) -> str | None:
    """The forward panel's entry for the run's own process: its Gaussian process or cold degradation."""
    from difflab.forward import FORWARD_PROCESSES

    own = method_class(cfg.method).forward_name(cfg)
    return own if own in FORWARD_PROCESSES else None


def _whole(cfg: dict, key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = cfg.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise CheckpointError(f"{where} is damaged ({key} {str(value)[:40]} is not a whole number in {lo}..{hi})")
    return value


def _diffusers_info(name: str, files: FolderReader) -> RunInfo:
    unet = "" if files.lexists("config.json") else "unet"
    where = os.path.join(unet, "config.json")
    cfg = files.json(where)
    files.regular(os.path.join(unet, UNET_WEIGHTS))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} in {name} is damaged (not a JSON object)")
    size = cfg.get("sample_size", 0)
    if isinstance(size, list) and len(size) == 2:
        h = _whole({"sample_size": size[0]}, "sample_size", 0, 1, MAX_SIDE, f"{where} in {name}")
        w = _whole({"sample_size": size[1]}, "sample_size", 0, 1, MAX_SIDE, f"{where} in {name}")
    else:
        h = w = _whole(cfg, "sample_size", 0, 1, MAX_SIDE, f"{where} in {name}")
    channels = _whole(cfg, "in_channels", 3, 1, MAX_CHANNELS, f"{where} in {name}")
    sched = "scheduler_config.json" if not unet else "scheduler/scheduler_config.json"
    T = 1000
    if files.lexists(sched):
        scfg = files.json(sched)
        if not isinstance(scfg, dict):
            raise CheckpointError(f"{sched} in {name} is damaged (not a JSON object)")
        T = _whole(scfg, "num_train_timesteps", 1000, 1, MAX_T, f"{sched} in {name}")
    from difflab.interop.folder_model import FOLDER_DEFAULTS

    return RunInfo(name, "diffusers", "gaussian", "none", (), (channels, h, w), 0, False, None, T,
                   FOLDER_DEFAULTS["steps"], sampler=FOLDER_DEFAULTS["sampler"])


def _kind(files: FolderReader) -> str | None:
    """"run", "diffusers" or None for a folder that is neither (a classifier's run draws no images)."""
    if files.lexists("config.json") and files.lexists("checkpoints"):
        try:
            method = files.json("config.json").get("method")  # type: ignore[union-attr]
        except (UsageError, AttributeError):
            method = None  # a damaged run is listed, and its entry says what is wrong
        return None if method in CLASSIFIERS else "run"
    for unet in ("", "unet"):
        if files.lexists(os.path.join(unet, "config.json")) and files.lexists(os.path.join(unet, UNET_WEIGHTS)):
            return "diffusers"
    return None


@dataclass
class _Entry:
    """One folder as last read: its kind (None: not a run), its info (and the info's JSON) or why it is
    damaged, when its loss log last changed, and the signatures of every path the reading looked at."""

    folder: Path
    kind: str | None
    info: RunInfo | None = None
    config: TrainConfig | None = None
    error: str | None = None
    seen: dict[str, tuple | None] = field(default_factory=dict)
    loss_mtime: float | None = None
    listed: dict = field(default_factory=dict)

    def fresh(self) -> bool:
        return all(_signature(p) == sig for p, sig in self.seen.items())

    def training(self) -> bool:
        return self.loss_mtime is not None and time.time() - self.loss_mtime < TRAINING_WINDOW_S


def _read_entry(name: str, folder: Path) -> _Entry:
    files = FolderReader(folder)
    kind = None
    try:
        kind = _kind(files)
        if kind == "diffusers":
            info = _diffusers_info(name, files)
            return _Entry(folder, kind, info, seen=files.seen, listed=info.to_json())
        if kind is None:
            return _Entry(folder, None, seen=files.seen)
        info, cfg = _run_info(name, files)
        loss = files.signature("loss.csv")  # a log that changed re-reads the run: that is cheap
        return _Entry(folder, kind, info, cfg, seen=files.seen, listed=info.to_json(),
                      loss_mtime=loss[3] / 1e9 if loss is not None and stat.S_ISREG(loss[0]) else None)
    except UsageError as e:  # CheckpointError and the config's own checks
        reason = " ".join(str(e).split())  # one line, whatever the run's files hold
        return _Entry(folder, kind or "run", error=reason, seen=files.seen,
                      listed={"name": name, "kind": kind or "run", "damaged": True, "error": reason})


def _count_entries(folder: Path, limit: int) -> None:
    """DataError when ``folder`` holds more than ``limit`` entries (counted without following links)."""
    n = 0
    for _, dirs, names in os.walk(folder):
        n += len(dirs) + len(names)
        if n > limit:
            raise DataError(f"the data folder {folder} holds over {limit:,} entries; the explorer does not read it")


class Catalog:
    """Runs under ``root`` by name, and their loaded models (cached per name, precision and step)."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"--runs {root} is not a folder")
        self.device = torch.device(device)
        self._models: dict[tuple[str, str], tuple[int, object]] = {}
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._entries_lock = threading.Lock()

    # --- the listing ---------------------------------------------------------------------------------
    def _entry(self, name: str, folder: str) -> _Entry:
        with self._entries_lock:
            entry = self._entries.get(folder)
        if entry is None or not entry.fresh():
            entry = _read_entry(name, Path(folder))
            with self._entries_lock:
                self._entries[folder] = entry
        return entry

    def _listing(self) -> dict[str, _Entry]:
        """Name -> entry of every run (damaged ones too); the runs folder itself when it is the only run."""
        try:
            with os.scandir(self.root) as it:
                found = sorted((e.name, e.path) for e in it if NAME.match(e.name) and e.is_dir(follow_symlinks=False))
        except OSError as e:
            raise UsageError(f"--runs {self.root} cannot be read ({e.strerror or e})") from e
        listing = {}
        for name, folder in found:
            entry = self._entry(name, folder)
            if entry.kind is not None:
                listing[name] = entry
        if not listing:
            entry = self._entry(self.root.name, str(self.root))
            if entry.kind is not None:
                listing[self.root.name] = entry
        if len(self._entries) > len(found) + 1:  # forget folders that went away
            with self._entries_lock:
                keep = {str(self.root), *(folder for _, folder in found)}
                for key in [k for k in self._entries if k not in keep]:
                    del self._entries[key]
        return listing

    def _named(self, name: str) -> _Entry:
        """The entry of run ``name``; UsageError for anything that is not a listed name."""
        if isinstance(name, str) and NAME.match(name):
            sub = self.root / name
            if sub.is_dir() and not sub.is_symlink():
                entry = self._entry(name, str(sub))
                if entry.kind is not None:
                    return entry
            listing = self._listing()  # the runs folder itself may be the run
            if name in listing:
                return listing[name]
        names = self.names()
        raise UsageError(f"unknown run {str(name)[:100]!r}; choose one of: {', '.join(names[:20]) or '(none)'}"
                         + (f" (and {len(names) - 20} more)" if len(names) > 20 else ""))

    def names(self) -> list[str]:
        """Folder names of the runs, damaged ones too, sorted (the runs folder itself counts when it is a run)."""
        return list(self._listing())

    def path(self, name: str) -> Path:
        """The folder of run ``name``; UsageError for anything that is not a listed name."""
        return self._named(name).folder

    def info(self, name: str) -> RunInfo:
        """What run ``name`` is; CheckpointError (its reason) for a damaged run."""
        entry = self._named(name)
        if entry.info is None:
            raise CheckpointError(f"run {name} is damaged: {entry.error}")
        return replace(entry.info, training=entry.training())

    def infos(self) -> list[dict]:
        """Every run as the page lists it (:meth:`RunInfo.to_json`); a damaged run as ``{name, kind, damaged,
        error}``."""
        return [{**e.listed, "training": e.training()} if e.info is not None else e.listed
                for e in self._listing().values()]

    # --- files of a run ------------------------------------------------------------------------------
    def read_file(self, name: str, rel: str, limit: int) -> bytes | None:
        """The bytes of ``rel`` in run ``name``, None when it does not exist; CheckpointError when it is a
        link out of the run, not a regular file or over ``limit`` bytes."""
        files = FolderReader(self.path(name))
        return files.read(rel, limit) if files.lexists(rel) else None

    def newest_grid(self, name: str) -> tuple[str, str] | None:
        """(file name, change key) of the newest PNG under the run's ``samples/`` that is a regular file
        inside the run of at most :data:`MAX_GRID` bytes; None when there is none."""
        files = FolderReader(self.path(name))
        if not files.lexists("samples") or not files.is_dir("samples"):
            return None
        best = None
        for p in (files.folder / "samples").glob("*.png"):
            if p.name.startswith("."):
                continue
            try:
                st = files.regular(f"samples/{p.name}", MAX_GRID)
            except CheckpointError:
                continue  # a link elsewhere, a FIFO, an oversized file: never shown
            if best is None or st.st_mtime_ns > best[1]:
                best = (p.name, st.st_mtime_ns)
        return None if best is None else (best[0], f"{best[0]}:{best[1]}")

    def training_data(self, name: str) -> ImageData:
        """The training data of run ``name`` as it trained, only when its fingerprint is the one the run's
        checkpoint recorded: a config.json may name any folder, and only the run's own data is shown."""
        from difflab.data import dataset_key
        from difflab.runs.data import load_data

        entry = self._named(name)
        info = self.info(name)
        if info.kind != "run" or entry.config is None:
            raise DataError("this model has no training data to show (a diffusers folder)")
        if not info.data_fingerprint:
            raise DataError(f"run {name} has recorded no fingerprint of its training data (no checkpoint yet?): "
                            "its data is not shown")
        data_path = Path(entry.config.data).expanduser()
        if dataset_key(entry.config.data) is None and data_path.is_dir():
            _count_entries(data_path, MAX_DATA_ENTRIES)
        data = load_data(entry.config)
        if data.fingerprint != info.data_fingerprint:
            raise DataError(f"the data {entry.config.data!r} that run {name}'s config.json names is not the data it "
                            "was trained on (its fingerprint differs): it is not shown")
        return data

    # --- models --------------------------------------------------------------------------------------
    def model(self, name: str, precision: str = "fp32"):
        """The loaded run (a :class:`difflab.runs.draw.Run`), loaded again when it has a newer checkpoint."""
        info = self.info(name)
        key = (name, precision)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached[0] == info.step:
                return cached[1]
            model = self._load(name, self.path(name), info)
            if precision == "bf16":
                model.speed_up(bf16=True)
            self._models[key] = (info.step, model)
            return model

    def _load(self, name: str, path: Path, info: RunInfo):
        from difflab.runs.draw import load_run

        if info.kind == "run":
            from difflab.methods.method import METHOD_CLASSES

            if METHOD_CLASSES[info.method].samples_from_data:
                self.training_data(name)  # its samples start from data images: only its own data
            for attempt in range(2):  # a checkpoint may be pruned between listing and reading
                try:
                    return load_run(path, self.device)
                except CheckpointError:
                    if attempt:
                        raise
        from difflab.interop.folder_model import FolderModel

        return FolderModel.load(path, self.device)  # its scheduler's grid, as the CLI and Python draw it
