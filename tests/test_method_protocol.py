"""Every method keeps the declared Method protocol, and the trainer, sampling and the figures ask the
method what it does instead of asking which method it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from difflab.config import TrainConfig
from difflab.data import ImageData
from difflab.processes.binomial import NoiseSettingsError
from difflab.training.methods import METHOD_CLASSES, Method, make_method

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"
CALLERS = ["training/trainer.py", "sampling.py", "cli/figures.py", "cli/sample.py", "serve/panels.py"]


@pytest.mark.parametrize("name", sorted(METHOD_CLASSES))
def test_every_method_keeps_the_protocol(name):
    method = make_method(TrainConfig(method=name))
    assert isinstance(method, Method) and method.name == name
    assert all(isinstance(v, dict) for v in method.trajectories().values())
    assert bool(method.trajectories()) == method.draws_samples  # a classifier draws no samples, so no figures


@pytest.mark.parametrize("name", ["noisy-classifier", "classifier"])
def test_a_classifier_method_learns_labels_and_draws_no_samples(name):
    from difflab.errors import UsageError

    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    data = ImageData(images, torch.tensor([0, 1, 2, 1]), None, "tiny", "f")
    with pytest.raises(UsageError, match="--conditioning class"):
        make_method(TrainConfig(method=name)).prepare(data)
    method = make_method(TrainConfig(method=name, conditioning="class", cond_drop=0.0))
    method.prepare(data)
    with pytest.raises(UsageError, match="labelled"):
        method.prepare(ImageData(images, None, None, "tiny", "f"))
    conf = method.network(data)
    assert conf["num_classes"] == 3 and conf["in_channels"] == 1
    from difflab import nets

    torch.manual_seed(0)
    net = nets.build(conf)
    x = images.float() / 127.5 - 1
    seeds = torch.arange(4, dtype=torch.int64)
    labels = torch.tensor([0, 1, 2, 1])
    loss = method.loss(net, x, {"class_labels": labels}, 3, seeds)
    assert loss.ndim == 0 and float(loss) > 0
    # the loss is the cross-entropy of the method's logits (the same per-sample noise for the same seeds)
    expected = torch.nn.functional.cross_entropy(method.logits(net, x, 3, seeds), labels)
    assert torch.allclose(loss, expected)
    with pytest.raises(UsageError, match="draws no samples"):
        method.sample(net, 2, (1, 8, 8))


def test_prepare_checks_settings_and_keeps_what_sampling_needs():
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    data = ImageData(images, None, None, "tiny", "f")
    cold = make_method(TrainConfig(method="cold"))
    cold.prepare(data)
    assert cold.samples_from_data and torch.equal(cold.reference, images.float() / 127.5 - 1)
    with pytest.raises(NoiseSettingsError):  # 100 pixels a step do not fit in 8x8 images
        make_method(TrainConfig(method="naive1", k=100)).prepare(data)
    assert make_method(TrainConfig(method="naive1")).preset == "series-alg1"
    assert make_method(TrainConfig(method="gaussian")).preset is None


def _name_checks(path: Path) -> list[str]:
    """Comparisons of a method's name (``method.name == ...``, ``cfg.method != ...``) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Attribute) and (side.attr == "method" or (
                        side.attr == "name" and isinstance(side.value, ast.Attribute) and side.value.attr == "method")):
                    found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_caller_asks_which_method_it_is():
    assert _name_checks(SRC / "training" / "methods.py") == []  # (the checker runs: methods.py has none either)
    found = [hit for rel in CALLERS for hit in _name_checks(SRC / rel)]
    assert found == []


def test_the_name_check_finds_comparisons(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("if cfg.method == 'naive1':\n    pass\nok = run.method.name != 'gaussian'\nx = method.preset\n")
    assert _name_checks(f) == ["m.py:1", "m.py:3"]


def test_a_method_of_a_foreign_network_samples_like_the_trained_one():
    from difflab import nets
    from difflab.sampling import sample_images
    from difflab.training.methods import GaussianMethod

    trained = make_method(TrainConfig(process="linear", T=50, prediction="eps"))
    conf = dict(nets.PRESETS["tiny"], in_channels=1, out_channels=1, image_size=8)
    torch.manual_seed(0)
    net = nets.build(conf)
    foreign = GaussianMethod.of(trained.process, "eps")  # (how the web page wraps a diffusers folder)
    a = sample_images(trained, net, None, 3, (1, 8, 8), steps=3, batch_size=2)
    b = sample_images(foreign, net, None, 3, (1, 8, 8), steps=3, batch_size=2)
    assert a.dtype == torch.uint8 and a.shape == (3, 1, 8, 8) and torch.equal(a, b)
