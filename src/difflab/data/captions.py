"""Captions made from class names, for text-conditioned training on labelled datasets.

Each class gets several phrasings ("the digit 7", "a handwritten seven", "number seven", "7"), so a
text-conditioned model learns the meaning rather than one fixed string. ``captions_for`` is
deterministic; ``caption_batch`` picks one phrasing per sample with a seeded generator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Fashion-MNIST class name (normalised: lower case, letters only) -> phrasings.
FASHION = {
    "tshirttop": ["a t-shirt", "a photo of a t-shirt", "a top", "a short sleeved shirt", "t-shirt"],
    "trouser": ["a pair of trousers", "a photo of trousers", "pants", "trousers"],
    "pullover": ["a pullover", "a photo of a sweater", "a jumper", "pullover"],
    "dress": ["a dress", "a photo of a dress", "a women's dress", "dress"],
    "coat": ["a coat", "a photo of a coat", "a jacket", "coat"],
    "sandal": ["a sandal", "a photo of a sandal", "an open summer shoe", "sandal"],
    "shirt": ["a shirt", "a photo of a shirt", "a long sleeved shirt", "shirt"],
    "sneaker": ["a sneaker", "a photo of a sneaker", "a running shoe", "sneaker"],
    "bag": ["a bag", "a photo of a bag", "a handbag", "bag"],
    "ankleboot": ["an ankle boot", "a photo of an ankle boot", "a boot", "ankle boot"],
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _words(name: str) -> str:
    """A class name as plain words: "ankle_boot" -> "ankle boot"."""
    return " ".join(re.sub(r"[_\-/]+", " ", name).split())


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _digit(name: str) -> int | None:
    """The digit a class name stands for ("7", "seven", "7 - seven"), or None."""
    words = _words(name).lower().split()
    for w in words:
        if w.isdigit() and len(w) == 1:
            return int(w)
        if w in DIGIT_WORDS:
            return DIGIT_WORDS.index(w)
    return None


def digit_phrasings(d: int, *, handwritten: bool = True) -> list[str]:
    """Phrasings of one digit: "the digit 7", "a handwritten seven", "number seven", "7"."""
    word = DIGIT_WORDS[d]
    style = "handwritten" if handwritten else "small"
    return [f"the digit {d}", f"a {style} {word}", f"number {word}", f"{d}", f"the number {d}"]


def generic_phrasings(name: str) -> list[str]:
    """Phrasings of any class name: "cat", "a cat", "a photo of a cat", "an image of a cat"."""
    noun = _words(name).lower()
    return [noun, _article(noun), f"a photo of {_article(noun)}", f"an image of {_article(noun)}"]


def captions_for(dataset_name: str, class_names: Sequence[str]) -> list[list[str]]:
    """Per class, the list of its phrasings (deterministic, each list non-empty).

    MNIST and the 8x8 digits use digit phrasings, Fashion-MNIST its own, emoji the caption itself
    (plus "<caption> emoji"), and any other dataset (a folder of class folders) generic ones.
    """
    kind = _key(dataset_name)
    out: list[list[str]] = []
    for name in class_names:
        d = _digit(name)
        if kind.startswith("fashion") and _key(name) in FASHION:
            phrasings = FASHION[_key(name)]
        elif kind.startswith(("mnist", "digits")) and d is not None:
            phrasings = digit_phrasings(d, handwritten=kind.startswith("mnist"))
        elif kind.startswith("emoji"):
            phrasings = [name, f"{name} emoji"]
        else:
            phrasings = generic_phrasings(name) if _words(name) else [str(name)]
        out.append(list(phrasings))
    return out


def caption_ids(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Per-image captions as (the distinct captions in first-seen order, int64 [N] index of each image's)."""
    index: dict[str, int] = {}
    ids = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(ids, dtype=torch.int64)


def caption_batch(
    captions: Sequence[Sequence[str]], labels: torch.Tensor, generator: torch.Generator | None = None
) -> list[str]:
    """One phrasing per sample, drawn uniformly among its class's phrasings with ``generator``.

    ``captions`` is what ``captions_for`` returns; ``labels`` int [B] (any device). The same
    generator state gives the same captions.
    """
    labels = labels.detach().cpu().long().reshape(-1)
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < len(captions)):
        raise ValueError(f"labels must lie in 0..{len(captions) - 1}")
    u = torch.rand(labels.numel(), generator=generator, dtype=torch.float64)
    counts = torch.tensor([len(c) for c in captions], dtype=torch.float64)[labels]
    picks = (u * counts).long().minimum(counts.long() - 1)
    return [captions[k][j] for k, j in zip(labels.tolist(), picks.tolist())]
