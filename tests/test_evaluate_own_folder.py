"""difflab evaluate on a run of your own folder: the reference follows the run's transform, and every missing
piece is one line before any sample is drawn."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.config import TrainConfig
from difflab.errors import UsageError
from difflab.evaluate import evaluate_images
from difflab.training.trainer import Trainer


def _folder(root, size=16, per_class=20, classes=("cats", "dogs")):
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[: size // 2, :, k] = 220  # each class has its own bright half
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 16 px folder trained at --image-size 8."""
    base = tmp_path_factory.mktemp("ownfolder")
    data = _folder(base / "data")
    out = base / "run"
    cfg = TrainConfig(data=str(data), image_size=8, model="tiny", out=str(out), steps=2, batch_size=8, sample_every=0,
                      checkpoint_every=2, sample_steps=2, autoguidance=1.0)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return data, out, cfg


def _main(capsys, *args):
    from difflab.cli import main

    capsys.readouterr()
    rc = main(["evaluate", *map(str, args)])
    return rc, capsys.readouterr()


def test_reference_is_the_folder_as_the_run_trained(folder_run):
    from difflab.runs.data import load_data, reference_data

    data, _, cfg = folder_run
    notes = []
    ref = reference_data(str(data), "test", cfg, notes)
    trained = load_data(cfg)
    assert tuple(ref.images.shape) == (40, 3, 8, 8) and torch.equal(ref.images, trained.images)
    # the same pixels; the reference also takes the class sub-folders, which the unconditional run did not ask for
    assert trained.labels is None and ref.labels is not None and len(ref.class_names) >= 2
    assert notes == [f"{data} has no test split: the samples are compared with its training images"]
    # without a run (a samples file, a diffusers folder), fitted to the samples' shape: the same images
    assert torch.equal(reference_data(str(data), "test", (3, 8, 8)).images, trained.images)


def test_evaluate_a_smaller_run_of_a_folder_with_classifier_features(folder_run, tmp_path, capsys, monkeypatch):
    data, out, _ = folder_run
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    rc, cap = _main(capsys, "--run", out, "--n", 12, "--steps", 2, "--features", "classifier", "--json",
                    tmp_path / "e.json")
    assert rc == 0, cap.err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["fid"] >= 0 and res["reference_n"] == 40 and res["features"].startswith("classifier-")
    assert not any("but the reference images are" in w for w in res["warnings"])
    assert "no test split" in cap.err.splitlines()[0]  # said before the samples were drawn


def test_missing_pieces_are_one_line_before_drawing(folder_run, capsys, monkeypatch):
    from difflab import model as model_module
    from difflab.evaluate import inception

    _, out, _ = folder_run

    def no_drawing(*a, **k):
        raise AssertionError("samples were drawn before the missing pieces were reported")

    monkeypatch.setattr(model_module, "samples_for_evaluation", no_drawing)
    monkeypatch.setattr(inception, "weights_file", lambda: (_ for _ in ()).throw(UsageError(inception.INSTALL)))
    rc, cap = _main(capsys, "--run", out, "--n", 12)
    assert rc == 2 and cap.err.strip().splitlines() == [f"difflab evaluate: error: {inception.INSTALL}"], cap.err


def test_unlabelled_reference_for_classifier_features_is_refused_first(tmp_path, capsys, monkeypatch):
    from difflab.data import load

    real = load("digits", split="test").images[:8]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(real):
        Image.fromarray(img[0].numpy()).save(flat / f"{i}.png")
    path = tmp_path / "s.npz"
    np.savez(path, images=real.permute(0, 2, 3, 1).numpy())
    rc, cap = _main(capsys, "--samples", path, "--data", flat, "--features", "classifier")
    assert rc == 2 and "classifier features need labelled reference data" in cap.err
    assert len(cap.err.strip().splitlines()) == 1


def test_labels_outside_the_datas_classes_are_an_error(tmp_path, capsys):
    from difflab.data import load

    real = load("digits", split="test")
    path = tmp_path / "s.npz"
    labels = real.labels[:30].numpy().copy()
    labels[3] = 99
    np.savez(path, images=real.images[:30].permute(0, 2, 3, 1).numpy(), labels=labels)
    rc, cap = _main(capsys, "--samples", path, "--data", "digits", "--features", "classifier")
    assert rc == 2, cap.out
    assert cap.err.strip().splitlines() == ["difflab evaluate: error: the samples' labels go up to 99 but digits has 10 "
                                            "classes (0..9): "
                                            "evaluate against the data the samples were drawn for"]
    with pytest.raises(UsageError, match="up to 99 but digits has 10 classes"):
        evaluate_images(real.images[:30], torch.from_numpy(labels), real, metrics=("accuracy",))
