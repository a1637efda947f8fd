"""Classifiers trained by the one Trainer: a method whose loss is the cross-entropy of class labels.

- :class:`NoisyClassifierMethod` (``--method noisy-classifier``): images noised to a random time of
  the run's Gaussian process, z_t = gammabar_t x + sigmabar_t s, t drawn as in diffusion training; the
  network ``noisy_classifier`` (``difflab.nets.noisy_classifier``) that classifier guidance differentiates.
- :class:`ImageClassifierMethod` (``--method classifier``): clean images; the ``small_cnn`` judge of
  ``difflab.evaluate.classifier``.

Both take the labels from the class condition (``conditioning="class"`` with ``cond_drop=0``: no null
labels), draw their noise per sample like :class:`~difflab.methods.method.GaussianMethod`, and draw no
samples: the trainer writes checkpoints, the log and the loss curve, never a sample grid.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from difflab import nets
from difflab.config import TrainConfig, channel_widths, process_config
from difflab.data import ImageData
from difflab.errors import CheckpointError, UsageError
from difflab.methods.noise_levels import training_times
from difflab.noise import seeded_normal, seeded_uniform
from difflab.processes.continuous import make_process
from difflab.processes.gaussian import GaussianProcess

NOISY_WIDTHS = "32,64,64"  # the noisy classifier's default level widths (``--channels 32``)


class _Classification:
    """What both classifiers share: labels from the class condition, no sampling."""

    name: ClassVar[str]
    preset: ClassVar[str | None] = None
    per_sample_seeds = True
    conditional = True
    predicts_previous_step = False
    samples_from_data = False
    draws_samples = False
    denoises = False
    samplers = ()

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def denoiser(self, net) -> None:
        return None  # a classifier's network gives class logits, not a denoised image

    @classmethod
    def forward_name(cls, cfg: TrainConfig) -> str | None:
        return None

    def sampling_defaults(self, grid_bottom: float | None = None) -> dict:
        return {}

    def prepare(self, data: ImageData) -> None:
        if data.labels is None or not data.num_classes:
            raise UsageError(f"a classifier needs labelled data (labels or class folders); {data.name} has none")
        if data.num_classes < 2:
            raise UsageError(f"a classifier needs at least 2 classes, {data.name} has {data.num_classes}")
        if self.cfg.conditioning != "class" or self.cfg.cond_drop != 0:
            raise UsageError(f"--method {self.name} learns the class labels: it needs --conditioning class "
                             "and --cond-drop 0")

    def batch_index(self, step: int) -> int:
        return step

    def loss(self, net, x: torch.Tensor, cond: dict | None, step: int, seeds: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the class labels given the (noised) images."""
        return F.cross_entropy(self.logits(net, x, step, seeds).float(), cond["class_labels"])

    def logits(self, net, x: torch.Tensor, step: int, seeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, net, n: int, shape, **_) -> torch.Tensor:
        raise UsageError(f"a {self.name} run draws no samples: pass it to 'difflab sample' as --classifier, "
                         "or train a diffusion run")

    def noising_chain(self, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
        raise UsageError(f"a {self.name} run has no forward process to draw")

    def trajectories(self) -> dict[str, dict]:
        return {}


class NoisyClassifierMethod(_Classification):
    """p(c | z_t, t) on images noised at uniform random times of the run's Gaussian process."""

    name = "noisy-classifier"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.process: GaussianProcess = make_process(process_config(cfg))

    def describe(self, data: ImageData | None = None) -> str:
        return f"noisy classifier on the {self.cfg.process} process ({data.num_classes if data else '?'} classes)"

    def network(self, data: ImageData) -> dict:
        widths = channel_widths(self.cfg.channels_mult or NOISY_WIDTHS)
        if any(w % widths[0] for w in widths):
            raise UsageError("--channels-mult of a noisy classifier: every width must be a multiple of the first")
        return {"kind": "noisy_classifier", "in_channels": data.channels, "num_classes": data.num_classes,
                "model_channels": widths[0], "channel_mult": [w // widths[0] for w in widths],
                "num_res_blocks": 1, "dropout": max(0.0, self.cfg.dropout),
                "norm_groups": math.gcd(32, widths[0])}

    def logits(self, net, x: torch.Tensor, step: int, seeds: torch.Tensor) -> torch.Tensor:
        p, dev = self.process, x.device
        t = training_times(p, seeded_uniform(seeds, step, (), dev), "uniform")
        z = p.marginal(x, t, seeded_normal(seeds, step, x.shape[1:], dev))
        return net(z.to(x.dtype), p.net_time(t))


class ImageClassifierMethod(_Classification):
    """p(c | x) on clean images (the evaluation judge)."""

    name = "classifier"

    def describe(self, data: ImageData | None = None) -> str:
        return f"classifier of clean images ({data.num_classes if data else '?'} classes)"

    def network(self, data: ImageData) -> dict:
        return {"kind": "small_cnn", "in_channels": data.channels, "num_classes": data.num_classes,
                "image_size": [data.height, data.width]}

    def logits(self, net, x: torch.Tensor, step: int, seeds: torch.Tensor) -> torch.Tensor:
        return net(x)


CLASSIFIER_METHODS = {m.name: m for m in (NoisyClassifierMethod, ImageClassifierMethod)}


def held_out_split(train: ImageData, test: ImageData | None, seed: int) -> tuple[ImageData, ImageData]:
    """(train, test) of labelled data: ``test`` when it is a labelled set of its own, else a seeded 10% of
    the training data held out (and not trained on)."""
    if train.labels is None or not train.num_classes:
        raise UsageError(f"a classifier needs labelled data (labels or class folders); {train.name} has none")
    if test is not None and test.labels is not None and test.fingerprint != train.fingerprint:
        return train, test
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, len(order) // 10)
    return train.subset(order[n_test:]), train.subset(order[:n_test])


def trained_network(tensors: dict[str, torch.Tensor], meta: dict, where: str,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The trained network of a checkpoint (its ``network`` config and ``model.*`` weights), frozen,
    in eval mode, on ``device``."""
    try:
        net = nets.build(meta["network"])
        net.load_state_dict(nets.split_prefix(tensors, "model"))
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint in {where} does not match its network config "
                              f"({str(e).splitlines()[0]})") from e
    return net.to(device).eval().requires_grad_(False)
