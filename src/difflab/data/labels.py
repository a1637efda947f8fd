"""Labels and captions of a folder's images: from class sub-folders (when asked), or from a Hugging Face
``imagefolder`` ``metadata.jsonl``.

``metadata.jsonl`` sits in the folder (of the split) and holds one JSON object a line: ``file_name`` (the
image's path relative to the folder), and optionally ``label`` (an integer or a class name) and ``text``
or ``caption`` (the image's caption). Images without a line are left out with a warning. The file is read
as hostile input: a bad line is reported by its number, paths must stay inside the folder.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from difflab.errors import DataError

METADATA = "metadata.jsonl"
_MAX_BYTES = 1 << 30
_CAPTION_KEYS = ("text", "caption")


@dataclass
class Metadata:
    """The lines of a ``metadata.jsonl``: file name -> (label or None, caption or None)."""

    entries: dict[str, tuple[int | str | None, str | None]]
    stamp: tuple[int, int]  # (size, mtime_ns) of the file: a cache key

    @property
    def has_labels(self) -> bool:
        return any(label is not None for label, _ in self.entries.values())

    @property
    def has_captions(self) -> bool:
        return any(caption is not None for _, caption in self.entries.values())


def read_metadata(root: Path) -> Metadata | None:
    """The ``metadata.jsonl`` of ``root``, or None when there is none."""
    path = root / METADATA
    if not path.is_file():
        return None
    st = path.stat()
    if st.st_size > _MAX_BYTES:
        raise DataError(f"{path} is over {_MAX_BYTES >> 30} GB")
    entries: dict[str, tuple[int | str | None, str | None]] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {number} is not JSON; each line must be an object with a file_name") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{path} line {number} has no file_name string")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"{path} line {number}: file_name {name[:80]!r} leaves the folder")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))
                                  or (isinstance(label, int) and not 0 <= label < 1 << 31)):
            raise DataError(f"{path} line {number}: label must be a class name or an integer 0..2^31-1")
        caption = next((row[k] for k in _CAPTION_KEYS if k in row), None)
        if caption is not None and not isinstance(caption, str):
            raise DataError(f"{path} line {number}: text/caption must be a string")
        entries[rel.as_posix()] = (label, caption)
    return Metadata(entries, (st.st_size, st.st_mtime_ns))


def described(root: Path, files: list[Path], metadata: Metadata | None) -> list[Path]:
    """``files`` that ``metadata`` describes (all of them without metadata); the others left out with a warning."""
    if metadata is None:
        return files
    kept = [rel for rel in files if rel.as_posix() in metadata.entries]
    if len(kept) < len(files):
        missing = [rel.as_posix() for rel in files if rel.as_posix() not in metadata.entries]
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        warnings.warn(f"left out {len(missing)} images of {root} that {METADATA} does not list: {shown}", stacklevel=3)
    if not kept:
        raise DataError(f"{root / METADATA} lists none of the images in {root}")
    return kept


def annotate(files: list[Path], metadata: Metadata | None, by_folder: bool | None) -> dict[str, np.ndarray]:
    """"labels", "class_names" and "captions" of ``files`` (each only when there are any) and "mixed".

    Labels come from ``metadata`` when it has them, else from the first-level sub-folders when ``by_folder``
    is True, or is None (decide) and the sub-folders are not all numbered (``0000/``, ``0001/``... are shards,
    not classes). "mixed": images sit both in the root and in sub-folders, so there are no sub-folder labels.
    """
    out: dict[str, np.ndarray] = {"mixed": np.array(False)}
    if metadata is not None and metadata.has_captions:
        out["captions"] = np.array([metadata.entries[f.as_posix()][1] or "" for f in files], dtype=str)
    if metadata is not None and metadata.has_labels:
        raw = [metadata.entries[f.as_posix()][0] for f in files]
        if any(r is None for r in raw) or len({type(r) for r in raw}) > 1:
            raise DataError(f"{METADATA}: give every image a label, all integers or all class names")
        if isinstance(raw[0], int):
            names = [str(k) for k in range(max(raw) + 1)]
            out["labels"] = np.array(raw, dtype=np.int64)
        else:
            names = sorted(set(raw))
            index = {n: k for k, n in enumerate(names)}
            out["labels"] = np.array([index[r] for r in raw], dtype=np.int64)
        out["class_names"] = np.array(names, dtype=str)
        return out
    if by_folder is False:
        return out
    top = [rel.parts[0] if len(rel.parts) > 1 else None for rel in files]
    if all(t is None for t in top):
        return out
    if None in top:
        out["mixed"] = np.array(True)
        return out
    names = sorted(set(top))
    if by_folder is None and all(n.isdigit() for n in names):
        return out
    index = {n: k for k, n in enumerate(names)}
    out["labels"] = np.array([index[t] for t in top], dtype=np.int64)
    out["class_names"] = np.array(names, dtype=str)
    return out
