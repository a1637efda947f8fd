"""Part 5: the noisy classifier p(c | z_t, t) that classifier guidance differentiates.

The classifier is trained on noisy images z_t = gammabar_t x + sigmabar_t s of the *same* Gaussian
process as the diffusion run it will steer (t drawn as in training), so it knows what a digit looks
like under every amount of noise. Guidance (``difflab.guidance.ClassifierGuidance``) needs
grad log p(c | y, sigma) in the samplers' VE coordinates y = z / gammabar, sigma = sigmabar / gammabar;
:class:`GuidanceClassifier` takes y and sigma, maps them to the process's own z_t and network time,
and autograd supplies the chain rule (grad_y = gammabar grad_z).

A classifier folder is a run folder of ``--method noisy-classifier``, trained by the one Trainer
(``difflab.methods.classification``): ``config.json``, ``loss.csv``, the run lock and the checkpoints
(atomic, checksummed safetensors + JSON), plus ``accuracy.json``, the noisy test accuracy.
Folders of the older format (checkpoint JSON ``"kind": "noisy-classifier"`` naming its process) still load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from difflab.config import TrainConfig, process_config
from difflab.data import to_model
from difflab.errors import CheckpointError, UsageError
from difflab.methods.classification import trained_network
from difflab.nets.noisy_classifier import NoisyClassifier
from difflab.processes.continuous import make_process
from difflab.processes.gaussian import GaussianProcess
from difflab.runs.checkpoint import latest_checkpoint

__all__ = ["REPORT_SIGMAS", "GuidanceClassifier", "NoisyClassifier", "load_classifier", "noisy_accuracy"]

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
