"""Folder fixes: GIF and WebP, any depth, no MNIST frame on a 28x28 folder, classes from sub-folders only
when asked (never from shard folders by themselves), metadata.jsonl labels and captions, the background of
transparent pixels, and ``--class NAME``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, features

from difflab.cli.sample import class_index
from difflab.config import TrainConfig
from difflab.data import load, open_source
from difflab.errors import DataError, UsageError
from difflab.runs.data import load_data, padded_size


def _save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _cfg(data: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), **kw)


def test_gif_first_frame_and_webp(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in ((200, 0, 0), (0, 0, 200))]
    _save(tmp_path / "a" / "x.gif", frames[0], save_all=True, append_images=frames[1:])
    d = load(tmp_path / "a")
    assert d.shape == (3, 6, 6) and d.images[0, :, 3, 3].tolist() == [200, 0, 0]
    if features.check("webp"):
        _save(tmp_path / "a" / "y.webp", Image.new("RGB", (6, 6), (0, 120, 0)), lossless=True)
        d = load(tmp_path / "a")
        assert len(d) == 2 and d.images[1, :, 3, 3].tolist() == [0, 120, 0]


def test_images_at_any_depth(tmp_path: Path) -> None:
    for k, rel in enumerate(("x.png", "a/b/c/y.png", "a/z.png", "d/e/f/g/h/w.png")):
        _save(tmp_path / "deep" / rel, Image.new("L", (4, 4), 10 * k))
    with pytest.warns(UserWarning, match="both in its root and in sub-folders"):
        d = load(tmp_path / "deep")
    assert len(d) == 4 and d.labels is None
    assert sorted(d.images[:, 0, 0, 0].tolist()) == [0, 10, 20, 30]


def test_only_the_builtin_mnist_sets_get_the_black_frame(tmp_path: Path) -> None:
    assert padded_size(28, 28, name="mnist") == padded_size(28, 28, name="Fashion_MNIST") == 32
    assert padded_size(28, 28, name=str(tmp_path)) is None and padded_size(28, 28, 64, name="mnist") is None
    for k in range(3):  # white icons with a dark dot
        im = Image.new("L", (28, 28), 255)
        im.putpixel((14, 14), 0)
        _save(tmp_path / "icons" / f"{k}.png", im)
    d = load_data(_cfg(tmp_path / "icons"))
    assert d.shape == (1, 32, 32)  # resized to what the networks halve three times, not padded
    assert d.images[:, 0, 0, 0].tolist() == [255, 255, 255] and d.images[:, 0, -1, -1].tolist() == [255] * 3
    assert load_data(_cfg(tmp_path / "icons", image_size=28)).shape == (1, 28, 28)


def _shards(root: Path, names: list[str]) -> Path:
    for k, name in enumerate(names):
        for j in range(2):
            _save(root / name / f"{j}.png", Image.new("L", (4, 4), 40 * k + j))
    return root


def test_shard_folders_never_become_classes_by_themselves(tmp_path: Path) -> None:
    root = _shards(tmp_path / "big", ["0000", "0001", "0002"])
    assert load(root).labels is None and load_data(_cfg(root)).labels is None
    asked = load_data(_cfg(root, labels=True))
    assert asked.class_names == ["0000", "0001", "0002"] and asked.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert load_data(_cfg(root, conditioning="class")).num_classes == 3
    assert load(root, labels=True).num_classes == 3


def test_named_sub_folders_are_classes_for_training_only_when_asked(tmp_path: Path) -> None:
    root = _shards(tmp_path / "pets", ["cat", "dog"])
    assert load(root).class_names == ["cat", "dog"]  # the library reads them (evaluation, the explorer)
    assert load_data(_cfg(root)).labels is None  # an unconditional run trains without them
    assert load_data(_cfg(root, conditioning="class")).class_names == ["cat", "dog"]
    assert load(root, labels=False).labels is None


def _metadata(root: Path, rows: list, text: str | None = None) -> None:
    (root / "metadata.jsonl").write_text(text if text is not None else "\n".join(json.dumps(r) for r in rows) + "\n")


def test_metadata_jsonl_labels_and_captions(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    for k in range(4):
        _save(root / "train" / "shard0" / f"{k}.png", Image.new("RGB", (4, 4), (50 * k, 0, 0)))
    _save(root / "train" / "shard0" / "extra.png", Image.new("RGB", (4, 4)))
    _metadata(root / "train", [{"file_name": f"shard0/{k}.png", "label": ["cat", "dog"][k % 2], "text": f"red {k}"}
                               for k in range(4)])
    with pytest.warns(UserWarning, match="left out 1 images .* does not list: shard0/extra.png"):
        d = load(root)
    assert len(d) == 4 and d.class_names == ["cat", "dog"] and d.labels.tolist() == [0, 1, 0, 1]
    assert d.captions == ["red 0", "red 1", "red 2", "red 3"]
    assert d.images[:, 0, 0, 0].tolist() == [0, 50, 100, 150]
    assert d.subset([3, 0]).captions == ["red 3", "red 0"]
    with pytest.warns(UserWarning):
        trained = load_data(_cfg(root))  # metadata labels need no flag
    assert trained.class_names == ["cat", "dog"] and trained.captions == d.captions
    _metadata(root / "train", [{"file_name": f"shard0/{k}.png", "label": k} for k in range(4)]
              + [{"file_name": "shard0/extra.png", "label": 7}])
    ints = load(root)
    assert ints.class_names == [str(k) for k in range(8)] and ints.labels.tolist() == [0, 1, 2, 3, 7]
    assert ints.captions is None


@pytest.mark.parametrize("text, message", [
    ('{"file_name": "a.png"}\nnot json\n', "line 2 is not JSON"),
    ('{"name": "a.png"}\n', "line 1 has no file_name"),
    ('{"file_name": "../a.png"}\n', "leaves the folder"),
    ('{"file_name": "/etc/a.png"}\n', "leaves the folder"),
    ('{"file_name": "a.png", "label": true}\n', "label must be"),
    ('{"file_name": "a.png", "label": 1.5}\n', "label must be"),
    ('{"file_name": "a.png", "text": 3}\n', "text/caption must be a string"),
    ('{"file_name": "b.png"}\n', "lists none of the images"),
    ('{"file_name": "a.png", "label": 1}\n{"file_name": "c.png"}\n', "give every image a label"),
])
def test_a_bad_metadata_jsonl_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    _save(tmp_path / "m" / "a.png", Image.new("L", (4, 4)))
    _save(tmp_path / "m" / "c.png", Image.new("L", (4, 4)))
    _metadata(tmp_path / "m", [], text)
    with pytest.raises(DataError, match=message) as e:
        load(tmp_path / "m")
    assert "\n" not in str(e.value)


def test_background_of_transparent_pixels(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (10, 200, 30, 255))
    _save(tmp_path / "t" / "a.png", im)
    white, black = load(tmp_path / "t"), load(tmp_path / "t", background="black")
    assert white.images[0, :, 0, 0].tolist() == [255, 255, 255] and black.images[0, :, 0, 0].tolist() == [0, 0, 0]
    assert white.images[0, :, 1, 1].tolist() == black.images[0, :, 1, 1].tolist() == [10, 200, 30]
    assert load_data(_cfg(tmp_path / "t", background="black")).images[0, :, 0, 0].tolist() == [0, 0, 0]
    gif = Image.new("P", (4, 4), 0)
    gif.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    gif.putpixel((2, 2), 1)
    _save(tmp_path / "g" / "a.gif", gif, transparency=0)
    assert load(tmp_path / "g", background="white").images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert load(tmp_path / "g", background="black").images[0, :, 2, 2].tolist() == [250, 0, 0]
    with pytest.raises(DataError, match="background must be white or black"):
        open_source(tmp_path / "t", background="grey")


def test_class_by_name_or_index() -> None:
    names = ["cat", "dog", "flags"]
    assert class_index("flags", names) == 2 and class_index("1", names) == 1 and class_index("0", None) == 0
    assert class_index("7", ["10", "7"]) == 1  # a saved name wins over an index
    assert class_index("-1", names) == -1  # an index out of range is refused with the request's range
    with pytest.raises(UsageError, match=r"--class 'bird' is not a class of this run \(its classes: cat, dog, flags\)"):
        class_index("bird", names)
    with pytest.raises(UsageError, match="saved no class names"):
        class_index("bird", None)


def test_text_runs_train_on_the_images_own_captions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from difflab.cli import main
    from difflab.training.trainer import Trainer

    root = tmp_path / "capt"
    for k in range(8):
        _save(root / f"{k}.png", Image.new("RGB", (8, 8), (30 * k, 0, 0)))
    _metadata(root, [{"file_name": f"{k}.png", "text": ["a red square", "a dark square"][k % 2]} for k in range(8)])
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run"), model="tiny", steps=2, batch_size=4, log_every=1,
                      checkpoint_every=2, sample_every=0, sample_steps=2, conditioning="text")
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    assert tr.conditioner.captions == [["a red square"], ["a dark square"]]
    _, labels, _ = tr.batch(0, 0)
    _, _, idx = tr.loader.get(0, 0)
    assert labels.tolist() == (idx % 2).tolist()  # even images are red, odd ones dark
    tr.run()
    out = tmp_path / "s.png"
    assert main(["sample", "--run", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert main(["sample", "--run", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--out", str(out), "--force",
                 "--prompt", "a dark square"]) == 0
    assert out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("crop", 1.5, r"--crop must be in \[0, 1\]"), ("crop", float("nan"), "--crop must be a finite number"),
    ("background", "grey", "--background must be one of white, black"),
])
def test_data_flags_are_checked(flag: str, value, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainConfig(**{flag: value}).validate()
