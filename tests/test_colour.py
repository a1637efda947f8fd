"""Colour statistics (difflab.evaluate.colour): exact answers on synthetic images, and --metrics colour."""

import json

import numpy as np
import pytest
import torch

from difflab.errors import UsageError
from difflab.evaluate.colour import SIXTHS, colour_stats, compare, describe


def image(pixels) -> torch.Tensor:
    """One uint8 image [1, 3, 1, P] holding the given RGB pixels in a row."""
    return torch.tensor(pixels, dtype=torch.uint8).T.reshape(1, 3, 1, -1)


def shares(**named) -> dict:
    return {k: named.get(k, 0.0) for k in SIXTHS}


def test_pure_red():
    s = colour_stats(torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 8, 8).contiguous())
    assert s == {"saturation": 1.0, "brightness": 1.0, "saturated": 1.0, "hue_shares": shares(red=1.0)}


def test_grey_has_no_saturation_and_no_hue():
    s = colour_stats(torch.full((2, 3, 4, 4), 128, dtype=torch.uint8))
    assert s == {"saturation": 0.0, "brightness": 128 / 255, "saturated": 0.0, "hue_shares": shares()}
    gray = colour_stats(torch.full((2, 1, 4, 4), 51, dtype=torch.uint8))  # one channel counts as grey
    assert gray["saturation"] == 0.0 and gray["brightness"] == pytest.approx(0.2) and gray["saturated"] == 0.0


def test_known_mix():
    # red, dark cyan, grey, a dark red below the brightness floor, a pale pink below the saturation floor
    s = colour_stats(image([(255, 0, 0), (0, 128, 128), (100, 100, 100), (20, 0, 0), (255, 200, 200)]))
    assert s["saturation"] == pytest.approx((1 + 1 + 0 + 1 + 55 / 255) / 5)
    assert s["brightness"] == pytest.approx((255 + 128 + 100 + 20 + 255) / (5 * 255))
    assert s["saturated"] == pytest.approx(2 / 5)
    assert s["hue_shares"] == shares(red=0.5, cyan=0.5)


def test_each_sixth_is_centred_on_its_colour():
    pure = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255)]
    assert colour_stats(image(pure))["hue_shares"] == {k: 1 / 6 for k in SIXTHS}
    # orange sits on the red/yellow border at hue 30 degrees: 127/255 of the way is red, 128/255 yellow
    assert colour_stats(image([(255, 127, 0)]))["hue_shares"] == shares(red=1.0)
    assert colour_stats(image([(255, 128, 0)]))["hue_shares"] == shares(yellow=1.0)
    # just below red's lower border (hue -31 degrees) is magenta
    assert colour_stats(image([(255, 0, 132)]))["hue_shares"] == shares(magenta=1.0)
    assert colour_stats(image([(255, 0, 127)]))["hue_shares"] == shares(red=1.0)


def test_compare_against_targets():
    ref = image([(255, 0, 0), (0, 255, 255)] * 2)  # saturation 1, brightness 1, half red, half cyan
    same = compare(ref, ref)
    assert same["ok"] and same["saturation_relative"] == 0 and same["hue_max_difference"] == 0
    # darker (brightness 0.8: -20%), all red (hue off by 0.5 in red and in cyan)
    off = compare(image([(204, 0, 0)] * 4), ref)
    assert off["brightness_relative"] == pytest.approx(-0.2) and off["saturation_relative"] == 0
    assert off["hue_max_difference"] == pytest.approx(0.5) and off["hue_worst_sixth"] in ("red", "cyan")
    assert off["within_target"] == {"saturation": True, "brightness": False, "hue": False} and not off["ok"]
    assert compare(image([(204, 0, 0)] * 4), colour_stats(ref)) == off  # the reference's statistics do as well
    # 10% darker and a sixth 0.05 off: within the targets
    near = compare(image([(230, 0, 0)] * 11 + [(0, 230, 230)] * 9), ref)
    assert near["ok"] and near["hue_max_difference"] == pytest.approx(0.05)
    assert "brightness 0.902" in describe(near) and "off target" in describe(off)


def test_bad_images_are_refused():
    with pytest.raises(UsageError, match="uint8"):
        colour_stats(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        colour_stats(torch.zeros(1, 2, 2, 2, dtype=torch.uint8))


def test_evaluate_cli_reports_colour(tmp_path, capsys):
    from difflab.cli import main
    from difflab.data import load

    real = load("digits", split="test").images[:20]
    path = tmp_path / "s.npz"
    np.savez(path, images=real.permute(0, 2, 3, 1).numpy())
    rc = main(["evaluate", "--samples", str(path), "--data", "digits", "--metrics", "colour",
               "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "colour" in out and "saturation 0.000" in out
    res = json.loads((tmp_path / "e.json").read_text())["colour"]
    want = colour_stats(real)["brightness"] / colour_stats(load("digits", split="test").images)["brightness"] - 1
    assert res["brightness_relative"] == pytest.approx(want) and res["saturation_relative"] == 0
