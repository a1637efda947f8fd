"""Part 5: the noisy classifier p(c | z_t, t) that classifier guidance differentiates.

The classifier is trained on noisy images z_t = gammabar_t x + sigmabar_t s of the *same* Gaussian
process as the diffusion run it will steer (t drawn as in training), so it knows what a digit looks
like under every amount of noise. Guidance (``difflab.guidance.ClassifierGuidance``) needs
grad log p(c | y, sigma) in the samplers' VE coordinates y = z / gammabar, sigma = sigmabar / gammabar;
:class:`GuidanceClassifier` takes y and sigma, maps them to the process's own z_t and network time,
and autograd supplies the chain rule (grad_y = gammabar grad_z).

A classifier folder holds ``checkpoints/step-N.safetensors`` + ``.json`` written by
``difflab.train.checkpoint.save_checkpoint`` (atomic, checksummed); the JSON names the network, the
process, the image shape, the class names and the noisy test accuracy.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.config import TrainConfig, load_run_config
from difflab.data import to_model
from difflab.errors import CheckpointError, DataError, UsageError
from difflab.nets.layers import Downsample, ResBlock, group_norm, timestep_embedding
from difflab.processes.continuous import make_process
from difflab.processes.gaussian import GaussianProcess
from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint, split_prefix

KIND = "noisy-classifier"
# noise levels (VE sigma = sigmabar / gammabar = 1 / sqrt(SNR)) at which the test accuracy is reported
REPORT_SIGMAS = (0.1, 0.5, 1.0, 2.0, 5.0)


class NoisyClassifier(nn.Module):
    """A small time-conditioned ResNet, ``net(z_t, t) -> logits [B, num_classes]``.

    The UNet's encoder without attention: a 3x3 stem, ``len(channel_mult)`` levels of
    ``num_res_blocks`` residual blocks (ADM scale-shift time conditioning) separated by stride-2
    convolutions, then GroupNorm, SiLU, global average pooling and a linear head. ``t`` is the
    network time (discrete: the step index; continuous: 1000 t), as for the diffusion networks.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, dropout: float = 0.0,
                 norm_groups: int = 32) -> None:
        super().__init__()
        if num_classes < 2:
            raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.config: dict[str, Any] = {
            "kind": "noisy_classifier", "in_channels": in_channels, "num_classes": num_classes,
            "model_channels": model_channels, "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks, "dropout": dropout, "norm_groups": norm_groups,
        }  # fmt: skip
        emb_dim = 4 * model_channels
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(ch, model_channels * mult, emb_dim, dropout, True, norm_groups))
                ch = model_channels * mult
            if level < len(channel_mult) - 1:
                self.blocks.append(Downsample(ch))
        self.head = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, num_classes))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] of noisy images ``z`` [B, C, H, W] at network time ``t`` [B]."""
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        param = self.time_embed[0].weight
        emb_act = F.silu(self.time_embed(timestep_embedding(t, self.model_channels).to(param.dtype)))
        h = self.stem(z)
        for block in self.blocks:
            h = block(h, emb_act) if isinstance(block, ResBlock) else block(h)
        return self.head(h)


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
    if meta.get("kind") != KIND:
        raise CheckpointError(f"'{run_dir}' is not a noisy classifier (a diffusion run?): pass the --out folder "
                              "of 'difflab train-classifier' to --classifier")
    config = {k: v for k, v in meta["network"].items() if k != "kind"}
    net = NoisyClassifier(**config).to(device)
    try:
        net.load_state_dict(split_prefix(tensors, "model"))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not match its network config "
                              f"({str(e).splitlines()[0]})") from e
    net.eval().requires_grad_(False)
    return GuidanceClassifier(net, make_process(meta["process"]), meta.get("class_names"), meta["image_shape"])


# --- training ----------------------------------------------------------------------------------
@dataclass
class ClassifierResult:
    """What ``train_classifier_run`` did: steps, wall time, where the weights are, noisy accuracy."""

    step: int
    seconds: float
    checkpoint: Path
    accuracy: list[dict[str, float]]  # [{"sigma": VE noise level, "t": process time, "accuracy": ...}]
    stopped_by: str  # "steps" or "time-limit"


def _data_config(run: str | Path | None, data: str | None, process: str, T: int, gamma: float,
                 image_size: int, image_channels: int) -> TrainConfig:
    """The data and process settings: a diffusion run's own, or the given ones."""
    if (run is None) == (data is None):
        raise UsageError("give exactly one of --run DIFFUSION_RUN_DIR or --data NAME")
    if run is not None:
        cfg = load_run_config(run)
        if cfg.method != "gaussian":
            raise UsageError(f"classifier guidance needs a Gaussian diffusion run; {run} is {cfg.method}")
        return cfg
    return TrainConfig(data=data, process=process, T=T, gamma=gamma, image_size=image_size,
                       image_channels=image_channels).validate()


def _splits(cfg: TrainConfig, seed: int):
    """(train images, train labels, test images, test labels, class names) as the diffusion run saw them;
    without a test split a seeded 10% of the training data is held out."""
    from difflab.runs import load_data

    train = load_data(cfg)
    if train.labels is None or not train.num_classes:
        raise UsageError(f"a classifier needs labelled data (labels or class folders); {cfg.data} has none")
    try:
        test = load_data(cfg, split="test")
        if test.labels is None or test.fingerprint == train.fingerprint:
            test = None
    except DataError:
        test = None
    if test is not None:
        return train.images, train.labels, test.images, test.labels, train.class_names
    order = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, len(order) // 10)
    held, kept = order[:n_test], order[n_test:]
    return train.images[kept], train.labels[kept], train.images[held], train.labels[held], train.class_names


def noisy_images(process: GaussianProcess, images: torch.Tensor, t: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """z_t = gammabar_t x + sigmabar_t s of uint8 images, noise from ``generator`` (on the CPU)."""
    x = to_model(images)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return process.marginal(x, t.to(x.device), noise)


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
    progress: bool = False,
    log: Callable[[str], Any] = print,
) -> ClassifierResult:
    """Train a noisy classifier into ``out`` on the data and Gaussian process of diffusion run ``run``
    (or on ``data`` with ``process``), with cross-entropy on z_t, t drawn like diffusion training.

    Stops after ``steps`` or ``time_limit`` minutes, saves, and measures the accuracy on ``eval_n``
    noisy test images at each of ``REPORT_SIGMAS``."""
    from difflab.runs import pick_device
    from difflab.train.methods import process_config

    out = Path(out)
    if list_checkpoints(out / "checkpoints"):
        raise UsageError(f"'{out}' already holds a trained classifier; choose another --out")
    for name, v in {"steps": steps, "batch_size": batch_size, "eval_n": eval_n,
                    "checkpoint_every": checkpoint_every, "model_channels": model_channels}.items():
        if v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if not 0 < lr < 1:
        raise UsageError(f"--lr must be in (0, 1), got {lr}")
    if time_limit < 0:
        raise UsageError("--time-limit must be positive (minutes)")
    cfg = _data_config(run, data, process, T, gamma, image_size, image_channels)
    proc = make_process(process_config(cfg))
    dev = pick_device(device)
    images, labels, test_images, test_labels, class_names = _splits(cfg, seed)
    num_classes = len(class_names) if class_names else int(labels.max()) + 1
    shape = list(images.shape[1:])
    groups = math.gcd(32, model_channels)
    torch.manual_seed(seed)
    net = NoisyClassifier(shape[0], num_classes, model_channels, channel_mult, norm_groups=groups).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    meta = {"kind": KIND, "network": net.config, "process": proc.config(), "image_shape": shape,
            "class_names": class_names, "data": cfg.data, "diffusion_run": str(run) if run else None,
            "train": {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed}}
    log(f"difflab: noisy classifier on {cfg.data} ({len(images)} images {'x'.join(map(str, shape))}, "
        f"{num_classes} classes) | {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters | "
        f"process {proc.config()} | device {dev} | batch {batch_size}")

    gen = torch.Generator().manual_seed(seed)
    images_dev, labels_dev = images.to(dev), labels.to(dev)
    t0 = time.monotonic()
    deadline = t0 + 60 * time_limit if time_limit else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    net.train()
    step, stopped_by, path = 0, "steps", None
    try:
        while step < steps:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            idx = torch.randint(0, len(images), (batch_size,), generator=gen).to(dev)
            t = proc.sample_t(batch_size, gen)
            z = noisy_images(proc, images_dev[idx], t, gen)
            loss = F.cross_entropy(net(z, proc.net_time(t).to(dev)), labels_dev[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix_str(f"loss {float(loss):.4f}", refresh=False)
            if step % checkpoint_every == 0:
                path = _save(out, step, net, meta)
            if deadline is not None and time.monotonic() >= deadline:
                stopped_by = "time-limit"
                break
    finally:
        if bar is not None:
            bar.close()
    net.eval().requires_grad_(False)
    seconds = time.monotonic() - t0
    classifier = GuidanceClassifier(net, proc, class_names, shape)
    accuracy = noisy_accuracy(classifier, test_images[:eval_n], test_labels[:eval_n], seed=seed)
    meta["accuracy"] = accuracy
    meta["train"]["seconds"] = round(seconds, 1)
    path = _save(out, step, net, meta)
    return ClassifierResult(step, seconds, path, accuracy, stopped_by)


def _save(out: Path, step: int, net: nn.Module, meta: dict) -> Path:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    return save_checkpoint(out / "checkpoints", step, tensors, meta, keep=2)
