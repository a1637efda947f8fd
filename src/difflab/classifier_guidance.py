"""Part 5: the noisy classifier p(c | z_t, t) that classifier guidance differentiates.

The classifier is trained on noisy images z_t = gammabar_t x + sigmabar_t s of the *same* Gaussian
process as the diffusion run it will steer (t drawn as in training), so it knows what a digit looks
like under every amount of noise. Guidance (``difflab.guidance.ClassifierGuidance``) needs
grad log p(c | y, sigma) in the samplers' VE coordinates y = z / gammabar, sigma = sigmabar / gammabar;
:class:`GuidanceClassifier` takes y and sigma, maps them to the process's own z_t and network time,
and autograd supplies the chain rule (grad_y = gammabar grad_z).

A classifier folder is a run folder of ``--method noisy-classifier``, trained by the one Trainer
(``difflab.train.classification``): ``config.json``, ``loss.csv``, the run lock and the checkpoints
(atomic, checksummed safetensors + JSON), plus ``accuracy.json``, the noisy test accuracy.
Folders of the older format (checkpoint JSON ``"kind": "noisy-classifier"`` naming its process) still load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.config import TrainConfig, load_run_config, process_config, save_json
from difflab.data import ImageData, to_model
from difflab.errors import CheckpointError, DataError, UsageError
from difflab.nets.noisy_classifier import NoisyClassifier
from difflab.processes.continuous import make_process
from difflab.processes.gaussian import GaussianProcess
from difflab.train.checkpoint import latest_checkpoint
from difflab.train.classification import held_out_split, trained_network

__all__ = ["REPORT_SIGMAS", "ClassifierResult", "GuidanceClassifier", "NoisyClassifier", "load_classifier",
           "noisy_accuracy", "train_classifier_run"]

KIND = "noisy-classifier"  # the method of a classifier run (and the "kind" of the older checkpoint format)
ACCURACY = "accuracy.json"
# noise levels (VE sigma = sigmabar / gammabar = 1 / sqrt(SNR)) at which the test accuracy is reported
REPORT_SIGMAS = (0.1, 0.5, 1.0, 2.0, 5.0)


class GuidanceClassifier(nn.Module):
    """A noisy classifier bound to its process: log p(c | y, sigma) in VE coordinates.

    ``class_names`` and ``image_shape`` come from the checkpoint (None: not checked)."""

    def __init__(self, net: NoisyClassifier, process: GaussianProcess, class_names: list[str] | None = None,
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net, self.process = net, process
        self.class_names = class_names
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.num_classes = int(net.config["num_classes"])

    def logits(self, y: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Logits [B, num_classes] of y (VE coordinates, y = z_t / gammabar_t) at noise level sigma."""
        if self.image_shape is not None and tuple(y.shape[1:]) != self.image_shape:
            raise UsageError(f"the classifier was trained on {'x'.join(map(str, self.image_shape))} images, "
                             f"these are {'x'.join(map(str, y.shape[1:]))}")
        sigma = torch.as_tensor(sigma, device=y.device).reshape(-1).expand(y.shape[0])
        t = self.process.t_of(sigma.double())
        z = y * self.process.signal_scale(t).to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        param = next(self.net.parameters())
        return self.net(z.to(param.dtype), self.process.net_time(t).to(y.device))

    def log_prob(self, y: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels | y, sigma), one value per sample [B]; differentiable in y."""
        labels = torch.as_tensor(labels, device=y.device).long().reshape(-1).expand(y.shape[0])
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise UsageError(f"--class must be in 0..{self.num_classes - 1} for this classifier")
        return self.logits(y, sigma).log_softmax(-1).gather(1, labels[:, None])[:, 0]


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> GuidanceClassifier:
    """The latest verified checkpoint of a ``difflab train-classifier`` folder, frozen, in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"classifier folder '{run_dir}' does not exist: give the --out folder of "
                              "'difflab train-classifier'")
    found = latest_checkpoint(run_dir / "checkpoints", device)
    if found is None:
        raise CheckpointError(f"'{run_dir}' has no classifier checkpoint: train one with "
                              f"difflab train-classifier --out {run_dir}")
    tensors, meta = found
    if meta.get("kind") == KIND:  # the older format: the checkpoint names its process
        process = meta["process"]
    elif (meta.get("config") or {}).get("method") == KIND:
        process = process_config(TrainConfig.from_json(meta["config"]))
    else:
        raise CheckpointError(f"'{run_dir}' is not a noisy classifier (a diffusion run?): pass the --out folder "
                              "of 'difflab train-classifier' to --classifier")
    net = trained_network(tensors, meta, str(run_dir), device)
    return GuidanceClassifier(net, make_process(process), meta.get("class_names"), meta["image_shape"])


# --- training ----------------------------------------------------------------------------------
@dataclass
class ClassifierResult:
    """What ``train_classifier_run`` did: steps, wall time, where the weights are, noisy accuracy."""

    step: int
    seconds: float
    checkpoint: Path | None
    accuracy: list[dict[str, float]]  # [{"sigma": VE noise level, "t": process time, "accuracy": ...}]
    stopped_by: str  # "steps", "time-limit" or "signal" (then no accuracy is measured)
    signal: int = 0


def _data_config(run: str | Path | None, data: str | None, process: str, T: int, gamma: float,
                 image_size: int, image_channels: int) -> dict[str, Any]:
    """The data and process settings: a diffusion run's own, or the given ones."""
    if (run is None) == (data is None):
        raise UsageError("give exactly one of --run DIFFUSION_RUN_DIR or --data NAME")
    if run is not None:
        cfg = load_run_config(run)
        if cfg.method != "gaussian":
            raise UsageError(f"classifier guidance needs a Gaussian diffusion run; {run} is {cfg.method}")
        data, process, T, gamma = cfg.data, cfg.process, cfg.T, cfg.gamma
        image_size, image_channels = cfg.image_size, cfg.image_channels
    return {"data": data, "process": process, "T": T, "gamma": gamma, "image_size": image_size,
            "image_channels": image_channels}


def _splits(cfg: TrainConfig) -> tuple[ImageData, ImageData]:
    from difflab.runs import load_data

    train = load_data(cfg)
    try:
        test = load_data(cfg, split="test")
    except DataError:
        test = None
    return held_out_split(train, test, cfg.seed)


@torch.no_grad()
def noisy_accuracy(classifier: GuidanceClassifier, images: torch.Tensor, labels: torch.Tensor,
                   sigmas: Sequence[float] = REPORT_SIGMAS, seed: int = 0,
                   batch_size: int = 500) -> list[dict[str, float]]:
    """Accuracy on uint8 test images noised to each VE level in ``sigmas`` (inside the process's range)."""
    proc = classifier.process
    device = next(classifier.net.parameters()).device
    lo, hi = proc.sigma_min(), proc.sigma_max()
    out = []
    for s in sigmas:
        if not lo <= s <= hi:
            continue
        t = proc.t_of(torch.tensor(s, dtype=torch.float64))
        gen = torch.Generator().manual_seed(seed)
        correct = 0
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            y = to_model(x) + s * torch.randn(x.shape, generator=gen).to(device)
            pred = classifier.logits(y, torch.full((len(x),), s, device=device)).argmax(1).cpu()
            correct += int((pred == labels[i:i + batch_size]).sum())
        out.append({"sigma": s, "t": float(t), "accuracy": correct / max(1, len(images))})
    return out


def train_classifier_run(
    out: str | Path,
    *,
    run: str | Path | None = None,
    data: str | None = None,
    process: str = "linear",
    T: int = 1000,
    gamma: float = 0.9,
    image_size: int = 0,
    image_channels: int = 0,
    steps: int = 2000,
    time_limit: float = 0.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    model_channels: int = 32,
    channel_mult: Sequence[int] = (1, 2, 2),
    seed: int = 0,
    device: str = "auto",
    eval_n: int = 2000,
    checkpoint_every: int = 1000,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], Any] = print,
) -> ClassifierResult:
    """Train a noisy classifier into run folder ``out`` on the data and Gaussian process of diffusion run
    ``run`` (or on ``data`` with ``process``): the Trainer with ``--method noisy-classifier``
    (cross-entropy on z_t, t drawn like diffusion training; the run lock, checks of ``out``, checkpoints,
    signals, the time limit and ``resume`` are the Trainer's).

    Stops after ``steps`` or ``time_limit`` minutes, saves, measures the accuracy on ``eval_n`` noisy
    test images at each of ``REPORT_SIGMAS`` and writes it to ``out/accuracy.json``."""
    from difflab.train.classification import classifier_config
    from difflab.train.trainer import Trainer

    for name, v in {"eval_n": eval_n, "model_channels": model_channels}.items():
        if v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if not 0 < lr < 1:
        raise UsageError(f"--lr must be in (0, 1), got {lr}")
    widths = ",".join(str(model_channels * m) for m in channel_mult)
    cfg = classifier_config(method=KIND, out=str(out), **_data_config(run, data, process, T, gamma, image_size,
                            image_channels), steps=steps, time_limit=time_limit, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, warmup=warmup, channels_mult=widths, seed=seed,
                            device=device, checkpoint_every=checkpoint_every, keep=2)
    train, test = _splits(cfg)
    trainer = Trainer(cfg, resume=resume, progress=progress, log=log, data=train)
    result = trainer.run()
    accuracy: list[dict[str, float]] = []
    if result.stopped_by != "signal":  # a signal asks for a quick exit
        classifier = load_classifier(trainer.out, trainer.device)
        accuracy = noisy_accuracy(classifier, test.images[:eval_n], test.labels[:eval_n], seed=seed)
        save_json(trainer.out / ACCURACY, {"step": result.step, "test_images": min(eval_n, len(test)),
                                           "accuracy": accuracy})
    return ClassifierResult(result.step, result.seconds, result.checkpoint, accuracy, result.stopped_by,
                            result.signal)

