"""What the network is conditioned on (part 5): nothing, a class label, or a text prompt.

Class labels enter as an embedding with one extra null entry (index ``num_classes``);
text enters as frozen token embeddings (``difflab.text``), the empty prompt being
null. During training the condition is replaced by the null one with probability
``cond_drop``, so one network serves conditional and unconditional sampling
(classifier-free guidance). Every random choice is a pure function of the run seed,
the step and the sample's position in the global batch, so training resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflab.errors import UsageError
from difflab.noise import seeded_uniform

NULL_PROMPT = ""


class Conditioner:
    """Builds the ``cond`` dict the networks take: ``class_labels`` or ``context`` + ``context_mask``."""

    def __init__(self, kind: str, num_classes: int = 0, cond_drop: float = 0.0,
                 captions: list[list[str]] | None = None, prompts=None):
        if kind not in ("none", "class", "text"):
            raise UsageError(f"unknown conditioning '{kind}'; choose none, class or text")
        if kind != "none" and not num_classes:
            raise UsageError(f"--conditioning {kind} needs a labelled dataset (labels or class folders)")
        self.kind, self.num_classes, self.cond_drop = kind, num_classes, cond_drop
        self.captions, self.prompts = captions, prompts  # prompts: a difflab.text.PromptCache
        if kind == "text":
            if captions is None or prompts is None:
                raise UsageError("text conditioning needs captions and a text encoder")
            prompts.add([c for group in captions for c in group] + [NULL_PROMPT])

    def training(self, labels: torch.Tensor | None, seeds: torch.Tensor, step: int) -> dict | None:
        """The condition of a training batch, dropped to null with probability cond_drop."""
        if self.kind == "none":
            return None
        drop = seeded_uniform(seeds, step, (), labels.device, salt=0x51ED27) < self.cond_drop
        if self.kind == "class":
            return {"class_labels": torch.where(drop, torch.full_like(labels, self.num_classes), labels)}
        pick = seeded_uniform(seeds, step, (), "cpu", salt=0x7A3B11)
        chosen = []
        for lab, u, d in zip(labels.tolist(), pick.tolist(), drop.tolist()):
            group = self.captions[lab]
            chosen.append(NULL_PROMPT if d else group[min(int(u * len(group)), len(group) - 1)])
        return self.text(chosen, labels.device)

    def text(self, prompts: Sequence[str], device) -> dict:
        tokens, mask = self.prompts.encode(list(prompts))
        return {"context": tokens.to(device), "context_mask": mask.to(device)}

    def classes(self, labels: torch.Tensor) -> dict:
        return {"class_labels": labels}

    def null(self, n: int, device) -> dict | None:
        """The null condition for a batch of n."""
        if self.kind == "class":
            return {"class_labels": torch.full((n,), self.num_classes, dtype=torch.long, device=device)}
        if self.kind == "text":
            return self.text([NULL_PROMPT] * n, device)
        return None

    def for_labels(self, labels: torch.Tensor, device) -> dict | None:
        """The condition of samples asked for by class index (text runs: the class's first caption)."""
        if self.kind == "class":
            return {"class_labels": labels.to(device)}
        if self.kind == "text":
            return self.text([self.captions[int(c)][0] for c in labels], device)
        return None
