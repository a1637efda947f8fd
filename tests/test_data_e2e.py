"""Every built-in data set and every folder layout trains, samples and evaluates with no data flag but --data
(tiny networks and a few steps; the built-in sets are evaluated against a slice of their reference). About a
minute each on the shared 2-core machine (Inception features on a CPU): one folder and one built-in set run
with the quick tests, the others with ``make test-slow``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflab.cli import main
from difflab.data import DATASETS
from difflab.data import folder as folder_module
from difflab.data.fashion_mnist import DEBIAN_DIR
from difflab.data.shards import pack
from difflab.runs import data as runs

FAST = ["--model", "tiny", "--steps", "2", "--batch-size", "4", "--sample-every", "0", "--sample-steps", "2",
        "--checkpoint-every", "2", "--log-every", "1"]
HAVE = {"mnist": importlib.util.find_spec("mnist") is not None,
        "fashion-mnist": (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
        "digits": importlib.util.find_spec("sklearn") is not None}


def _rgb(k: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(k)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _save(path: Path, im: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def _flat(root: Path) -> None:
    for k in range(12):
        _save(root / f"{k:02d}.png", _rgb(k))


def _classes(root: Path) -> None:
    for k in range(12):
        _save(root / ("cat" if k % 2 else "dog") / f"{k:02d}.jpg", _rgb(k))


def _shards(root: Path) -> None:
    for k in range(12):
        _save(root / f"{k % 3:04d}" / f"{k:02d}.png", _rgb(k))


def _deep(root: Path) -> None:
    for k in range(12):
        _save(root / "a" / str(k % 2) / "b" / f"{k:02d}.png", _rgb(k))


def _imagefolder(root: Path) -> None:
    rows = []
    for split in ("train", "test"):
        for k in range(8):
            _save(root / split / "images" / f"{k}.png", _rgb(k + (100 if split == "test" else 0)))
            if split == "train":
                rows.append({"file_name": f"images/{k}.png", "label": ["red", "blue"][k % 2], "text": f"picture {k % 3}"})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                                     if split == "train" else "")
    (root / "test" / "metadata.jsonl").unlink()


def _icons28(root: Path) -> None:
    for k in range(10):
        im = Image.new("L", (28, 28), 255)
        im.putpixel((k, k), 0)
        _save(root / f"{k}.png", im)


def _gif_webp_alpha(root: Path) -> None:
    for k in range(4):
        _save(root / f"{k}.gif", _rgb(k).convert("P"))
        rgba = _rgb(k + 10).convert("RGBA")
        rgba.putpixel((0, 0), (0, 0, 0, 0))
        _save(root / f"{k}.png", rgba)
        _save(root / f"{k}.webp", _rgb(k + 20), lossless=True)


def _packed(root: Path) -> None:
    src = root.parent / "src"
    _classes(src)
    from difflab.data import open_source

    pack(open_source(src, labels=True), root)


LAYOUTS = {"flat": _flat, "classes": _classes, "shards": _shards, "deep": _deep, "imagefolder": _imagefolder,
           "icons28": _icons28, "gif-webp-alpha": _gif_webp_alpha, "packed": _packed, "streamed": _flat}


def _run_all(data: str, tmp_path: Path, capsys) -> dict:
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--out", str(run), *FAST]) == 0, capsys.readouterr().err
    assert (run / "samples" / "final.png").exists()
    assert main(["sample", "--run", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["evaluate", "--run", str(run), "--n", "8", "--steps", "2", "--metrics", "fid,kid",
                 "--batch-size", "8", "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    return json.loads((tmp_path / "e.json").read_text())


def _slow_but(quick: str, names) -> list:
    return [n if n == quick else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("layout", _slow_but("flat", LAYOUTS))
def test_every_folder_layout_trains_samples_and_evaluates(layout: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    if layout == "streamed":
        monkeypatch.setattr(folder_module, "STREAM_FROM", 5)
    root = tmp_path / layout
    LAYOUTS[layout](root)
    result = _run_all(str(root), tmp_path, capsys)
    assert result["n"] == 8 and np.isfinite(result["fid"])


@pytest.mark.parametrize("name", _slow_but("digits", DATASETS))
def test_every_builtin_set_trains_samples_and_evaluates(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    if name in HAVE and not HAVE[name]:
        pytest.skip(f"{name} is not installed here")
    if name == "emoji":
        from difflab.data.emoji import load_emoji
        from difflab.errors import DataError

        try:
            load_emoji(split="train", image_size=8)
        except DataError as e:
            pytest.skip(str(e))
    real = runs.reference_data

    def a_slice(*args, **kw):  # the built-in test splits hold thousands of images: Inception on 64 of them
        return real(*args, **kw).subset(64)

    monkeypatch.setattr(runs, "reference_data", a_slice)
    result = _run_all(name, tmp_path, capsys)
    assert result["n"] == 8 and np.isfinite(result["fid"])
