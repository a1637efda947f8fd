"""The Python API refuses what the command line refuses: one table of bad arguments, each tried through
``difflab.load(...)``/``Model``/``difflab.train`` (a one-line UsageError) and through the matching command
(exit 2, one line), with every file of the run byte-identical afterwards."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import TINY, assert_refused, files

import difflab
from difflab.errors import UsageError


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("api") / "run"
    difflab.train(out=out, data="digits", model="tiny", batch_size=8, log_every=1, checkpoint_every=2,
                  sample_every=0, sample_steps=1, warmup=1, steps=2, conditioning="class")
    return out


@pytest.fixture(scope="module")
def model(run):
    return difflab.load(run)


def _img(model):
    return torch.zeros(2, *model.shape, dtype=torch.uint8)


# id: (the API call (model, run, tmp), the command's arguments ({run}, {tmp} filled in) or None where no flag
# takes the value)
TRAIN = dict(data="digits", model="tiny", batch_size=8, steps=1, sample_every=0)
TABLE = {
    "sample-n-float": (lambda m, r, t: m.sample(2.0, steps=1), ["sample", "--n", "2.0"]),
    "sample-n-zero": (lambda m, r, t: m.sample(0, steps=1), ["sample", "--n", "0"]),
    "sample-n-huge": (lambda m, r, t: m.sample(10**12, steps=1), ["sample", "--n", str(10**12)]),
    "sample-n-text": (lambda m, r, t: m.sample("3", steps=1), ["sample", "--n", "three"]),
    "sample-seed-negative": (lambda m, r, t: m.sample(1, seed=-1, steps=1), ["sample", "--seed", "-1"]),
    "sample-seed-huge": (lambda m, r, t: m.sample(1, seed=2**70, steps=1), ["sample", "--seed", str(2**70)]),
    "sample-steps-zero": (lambda m, r, t: m.sample(1, steps=0), ["sample", "--steps", "0"]),
    "sample-sampler": (lambda m, r, t: m.sample(1, sampler="x", steps=1), ["sample", "--sampler", "x"]),
    "sample-guidance-nan": (lambda m, r, t: m.sample(1, guidance=math.nan, steps=1), ["sample", "--guidance", "nan"]),
    "sample-class-99": (lambda m, r, t: m.sample(1, labels=[99], steps=1), ["sample", "--class", "99"]),
    "sample-eta": (lambda m, r, t: m.sample(1, sampler="ddim", eta=5, steps=1), ["sample", "--sampler", "ddim",
                                                                                 "--eta", "5"]),
    "sample-pil-text": (lambda m, r, t: m.sample(1, steps=1, pil="no"), None),
    "sample-start-none": (lambda m, r, t: m.sample(1, steps=1, start=None), None),  # (found by the fuzz test)
    "sample-start-negative": (lambda m, r, t: m.sample(1, steps=1, start=-3), ["sample", "--start", "-3"]),
    "load-none": (lambda m, r, t: difflab.load(None), ["sample", "--run", ""]),
    "load-number": (lambda m, r, t: difflab.load(5), None),
    "load-missing": (lambda m, r, t: difflab.load(t / "nope"), ["sample", "--run", "{tmp}/nope"]),
    "load-device-tpu": (lambda m, r, t: difflab.load(r, device="tpu"), ["sample", "--device", "tpu"]),
    "load-device-number": (lambda m, r, t: difflab.load(r, device=7), ["sample", "--device", "7"]),
    "load-ema-tiny": (lambda m, r, t: difflab.load(r, ema_length=1e-200), ["sample", "--ema-length", "1e-200"]),
    "load-ema-text": (lambda m, r, t: difflab.load(r, ema_length="0.1"), ["sample", "--ema-length", "x"]),
    "interpolate-seeds": (lambda m, r, t: m.interpolate(-1, 2**70, 3, steps=1),
                          ["interpolate", "--seeds", "-1", str(2**70)]),
    "interpolate-n-one": (lambda m, r, t: m.interpolate(1, 2, 1, steps=1), ["interpolate", "--seeds", "1", "2", "--n", "1"]),
    "interpolate-steps": (lambda m, r, t: m.interpolate(1, 2, 3, steps=0), ["interpolate", "--seeds", "1", "2",
                                                                            "--steps", "0"]),
    "interpolate-float-seed": (lambda m, r, t: m.interpolate(1.5, 2, 3, steps=1), ["interpolate", "--seeds", "1.5", "2"]),
    "interpolate-label": (lambda m, r, t: m.interpolate(1, 2, 3, steps=1, label=-4), ["interpolate", "--seeds", "1", "2",
                                                                                     "--class", "-4"]),
    "invert-refine": (lambda m, r, t: m.invert(_img(m), steps=1, refine=-1), ["invert", "--data", "digits",
                                                                             "--refine", "-1"]),
    "invert-steps": (lambda m, r, t: m.invert(_img(m), steps=0), ["invert", "--data", "digits", "--steps", "0"]),
    "invert-batch": (lambda m, r, t: m.invert(_img(m), steps=1, batch_size=0), ["invert", "--data", "digits",
                                                                               "--batch-size", "0"]),
    "likelihood-seed": (lambda m, r, t: m.likelihood(_img(m), steps=1, seed=-1), ["likelihood", "--data", "digits",
                                                                                  "--seed", "-1"]),
    "likelihood-probes": (lambda m, r, t: m.likelihood(_img(m), steps=1, hutchinson_samples=0),
                          ["likelihood", "--data", "digits", "--hutchinson-samples", "0"]),
    "evaluate-n": (lambda m, r, t: m.evaluate(0), ["evaluate", "--n", "0"]),
    "train-data-none": (lambda m, r, t: difflab.train(**{**TRAIN, "data": None}, out=str(t / "o")),
                        ["train", "--data", "", "--out", "{tmp}/o"]),
    "train-channels-list": (lambda m, r, t: difflab.train(**TRAIN, channels_mult=[16, 32], out=str(t / "o")),
                            ["train", "--channels-mult", "a,b", "--out", "{tmp}/o"]),
    "train-steps-float": (lambda m, r, t: difflab.train(**{**TRAIN, "steps": 1.5}, out=str(t / "o")),
                          ["train", "--steps", "1.5", "--out", "{tmp}/o"]),
    "train-lr-nan": (lambda m, r, t: difflab.train(**TRAIN, lr=math.nan, out=str(t / "o")),
                     ["train", "--lr", "nan", "--out", "{tmp}/o"]),
    "train-device": (lambda m, r, t: difflab.train(**TRAIN, device="tpu", out=str(t / "o")),
                     ["train", "--device", "tpu", "--out", "{tmp}/o"]),
    "train-resume-text": (lambda m, r, t: difflab.train(**TRAIN, resume="no", out=str(t / "o")), None),
    "train-unknown": (lambda m, r, t: difflab.train(**TRAIN, bogus=1, out=str(t / "o")),
                      ["train", "--bogus", "1", "--out", "{tmp}/o"]),
}
N_API_CASES = len(TABLE) + sum(v[1] is not None for v in TABLE.values())

NEEDS_RUN = ("sample", "interpolate", "invert", "likelihood", "evaluate")


@pytest.mark.parametrize("case", TABLE)
def test_api_refuses_with_one_line(run, model, tmp_path, case):
    call, _ = TABLE[case]
    before = files(run)
    with pytest.raises(UsageError) as e:
        call(model, run, tmp_path)
    assert len(str(e.value).splitlines()) == 1, str(e.value)
    assert files(run) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", [c for c, (_, argv) in TABLE.items() if argv is not None])
def test_cli_refuses_the_same_with_one_line(run, tmp_path, case):
    argv = [a.format(tmp=tmp_path) for a in TABLE[case][1]]
    if argv[0] in NEEDS_RUN and "--run" not in argv:
        argv[1:1] = ["--run", str(run)]
    if argv[0] in ("sample", "interpolate", "invert"):
        argv += ["--out", str(tmp_path / "g.png")]
    if argv[0] == "train":
        argv += [a for a in TINY if a not in argv]
    assert_refused(run, *argv)
    assert not (tmp_path / "o").exists() and not (tmp_path / "g.png").exists()


_HOSTILE = st.sampled_from([None, -1, 0, 2.5, "x", True, 2**70, math.nan, math.inf, [1], {}, b"\x00"])


@given(st.dictionaries(st.sampled_from(["n", "seed", "steps", "sampler", "guidance", "labels", "eta", "spacing",
                                        "batch_size", "start", "clip", "precision"]), _HOSTILE, min_size=1, max_size=3))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_sample_arguments(run, model, kwargs):
    """Any hostile values of sample's arguments: images of the asked shape, or one UsageError line."""
    before = files(run)
    n = kwargs.pop("n", 1)
    kwargs.setdefault("steps", 1)
    try:
        images = model.sample(n, **kwargs)
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == model.shape
    except UsageError as e:
        assert len(str(e).splitlines()) == 1, str(e)
    assert files(run) == before
