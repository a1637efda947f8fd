"""What the page may ask for, validated in one place: each request is a small frozen dataclass built
by ``from_json(body, info)`` from the JSON a client sent and the run it names. Anything wrong is a
:class:`BadRequest` with one line for the page (HTTP 400), before any model work is queued.

The sample panel's request is the library's :class:`~difflab.runs.request.SampleRequest` (:func:`sample_request`
adds the page's limits); the compare and interpolate panels are built from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from difflab.errors import UsageError
from difflab.methods.method import method_class
from difflab.runs.request import PRECISIONS, SampleRequest
from difflab.samplers import SPACINGS
from difflab.serve.catalog import RunInfo

MAX_COUNT = 64
MAX_SEED = 2**31 - 1
MAX_DEPTH = 16  # nesting of a JSON body (the page sends 3)
MAX_NUMBER = 40  # characters of one number in a JSON body
MAX_REFINE = 10  # fixed-point iterations per inversion step (3 reach 1/255 on digits)


class BadRequest(UsageError):
    """A request the page should not have sent: answered with HTTP 400 and this message."""


class _NotFinite(str):
    """NaN, Infinity or a number beyond float range where the body had a number: refused by its key."""


def _number(text: str, kind: type) -> int | float | _NotFinite:
    if len(text) > MAX_NUMBER:
        raise BadRequest(f"the body holds a number of {len(text)} characters (the limit is {MAX_NUMBER})")
    value = kind(text)
    return value if math.isfinite(value) else _NotFinite(text)


def parse_body(raw: bytes) -> dict:
    """A request body as strict JSON: a UTF-8 object, numbers finite (no NaN, Infinity or 1e400) and of at
    most :data:`MAX_NUMBER` characters, nesting at most :data:`MAX_DEPTH` deep; else BadRequest."""
    too_deep = BadRequest(f"the body is nested too deeply (the limit is {MAX_DEPTH} levels)")
    try:
        body = json.loads(raw or b"{}", parse_constant=_NotFinite, parse_int=lambda t: _number(t, int),
                          parse_float=lambda t: _number(t, float))
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e.msg if hasattr(e, 'msg') else e.reason})") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    level, todo = 0, [("body", body)]
    while todo:  # one level at a time: (the key a value is under, the value)
        level += 1
        if level > MAX_DEPTH:
            raise too_deep
        below = []
        for key, value in todo:
            for k, v in (value.items() if isinstance(value, dict) else ((key, v) for v in value)):
                if isinstance(v, _NotFinite):
                    raise BadRequest(f"{k} must be a number, got {v} (JSON numbers are finite)")
                if isinstance(v, (dict, list)):
                    below.append((k, v))
        todo = below
    return body


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BadRequest(f"{key} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {int(value)}")
    return int(value)


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _choice(body: dict, key: str, default: str | None, choices) -> str | None:
    value = body.get(key, default)
    if value not in choices:
        raise BadRequest(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def run_name(body: dict) -> str:
    name = body.get("run")
    if not isinstance(name, str) or not name:
        raise BadRequest("choose a run (the 'run' field is missing)")
    return name


def sample_request(body: dict, info: RunInfo) -> SampleRequest:
    """The sample panel's request: the page's own limits checked here (JSON types, count, prompt length, the
    run's step and class ranges), then the library's :class:`~difflab.runs.request.SampleRequest` checks it
    against the run. A guidance of 1 leaves the run's own scale (as ``difflab sample`` without --guidance)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    samplers = method_class(info.method).samplers
    if samplers:  # left out: the run's own sampler
        sampler = None if body.get("sampler") is None else _choice(body, "sampler", None, list(samplers))
    else:
        if body.get("sampler") not in (None, "", "default"):
            raise BadRequest(f"this is a {info.method} run: it samples with its own algorithm, not "
                             f"{body.get('sampler')!r}")
        sampler = None
    guidance = _float(body, "guidance", 1.0, -20.0, 20.0)
    label = body.get("label")
    if label is not None and info.class_names:
        label = _int(body, "label", None, 0, len(info.class_names) - 1)
    prompt = body.get("prompt") or None
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 200):
        raise BadRequest("the prompt must be text of at most 200 characters")
    values = dict(run=info.name, sampler=sampler, steps=_int(body, "steps", info.sample_steps, 1, info.max_steps),
                  guidance=None if guidance == 1.0 else guidance, labels=label, prompt=prompt,
                  seed=_int(body, "seed", 0, 0, MAX_SEED), n=_int(body, "count", 16, 1, MAX_COUNT),
                  precision=_choice(body, "precision", "fp32", PRECISIONS), start=_int(body, "first", 0, 0, MAX_SEED))
    try:
        return SampleRequest(**values).resolve(info.traits())
    except UsageError as e:
        raise BadRequest(str(e)) from e


@dataclass(frozen=True)
class CompareRequest:
    """The same seeds with several samplers or step counts: one SampleRequest per column."""

    columns: tuple[SampleRequest, ...]

    @classmethod
    def from_json(cls, body: dict, info: RunInfo) -> CompareRequest:
        base = sample_request({**body, "count": body.get("count", 4)}, info)
        if base.n > 16:
            raise BadRequest("compare at most 16 seeds at once")
        cols = body.get("columns")
        if not isinstance(cols, list) or not 2 <= len(cols) <= 6:
            raise BadRequest("compare needs 2 to 6 columns of {sampler, steps}")
        columns = []
        for col in cols:
            if not isinstance(col, dict):
                raise BadRequest("each column must be an object {sampler, steps}")
            one = sample_request({**body, "count": base.n, "sampler": col.get("sampler", base.sampler),
                                  "steps": col.get("steps", base.steps)}, info)
            columns.append(replace(one, precision=base.precision))
        return cls(tuple(columns))


@dataclass(frozen=True)
class InterpolateRequest:
    """slerp between the starting noise of sample 0 of two seeds, ``n`` images decoded by DDIM."""

    run: str
    seed_a: int
    seed_b: int
    n: int
    steps: int
    label: int | None

    @classmethod
    def from_json(cls, body: dict, info: RunInfo) -> InterpolateRequest:
        _gaussian(info, "interpolation")
        one = sample_request({k: body[k] for k in ("steps", "label") if k in body}, info)
        label = None if body.get("label") is None else int(one.labels[0])  # else the null condition
        return cls(info.name, _int(body, "seed_a", 0, 0, MAX_SEED), _int(body, "seed_b", 1, 0, MAX_SEED),
                   _int(body, "n", 8, 2, 32), one.steps, label)


@dataclass(frozen=True)
class InvertRequest:
    """DDIM-invert one image (uploaded bytes, or dataset image ``index``) and reconstruct it, on the grid
    ``spacing`` with ``refine`` fixed-point iterations per inversion step (as ``difflab invert``)."""

    run: str
    steps: int
    index: int | None
    image: torch.Tensor | None  # uint8 [C, H, W], fitted to the run
    spacing: str = "uniform"
    refine: int = 0

    @classmethod
    def from_json(cls, body: dict, info: RunInfo, max_bytes: int) -> InvertRequest:
        import base64
        import binascii

        _gaussian(info, "inversion")
        steps = _int(body, "steps", 50, 1, info.max_steps)
        how = {"spacing": _choice(body, "spacing", "uniform", SPACINGS), "refine": _int(body, "refine", 0, 0, MAX_REFINE)}
        image, index = body.get("image"), body.get("index")
        if (image is None) == (index is None):
            raise BadRequest("give either an uploaded image or a dataset index")
        if image is not None:
            if not isinstance(image, str):
                raise BadRequest("the image must be a data URL or base64 text")
            text = image.split(",", 1)[1] if image.startswith("data:") else image
            if len(text) > (max_bytes * 4) // 3 + 8:
                raise BadRequest(f"the image is over {max_bytes / 2**20:.0f} MiB")
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadRequest("the image is not valid base64") from e
            from difflab.data.upload import decode_image_bytes

            try:  # decoded here, so that a bad file is a 400 before any work is queued
                return cls(info.name, steps, None, decode_image_bytes(raw, info.shape, max_bytes=max_bytes), **how)
            except UsageError as e:
                raise BadRequest(str(e)) from e
        return cls(info.name, steps, _int(body, "index", 0, 0, 10**7), None, **how)


@dataclass(frozen=True)
class ForwardRequest:
    """The forward process ``process`` on dataset image ``index`` of a run's training data."""

    run: str
    process: str
    index: int
    seed: int

    @classmethod
    def from_json(cls, body: dict, info: RunInfo) -> ForwardRequest:
        from difflab.forward import FORWARD_PROCESSES

        if info.data is None:
            raise BadRequest("this model has no training data to show (a diffusers folder)")
        return cls(info.name, _choice(body, "process", "cosine", list(FORWARD_PROCESSES)),
                   _int(body, "index", 0, 0, 10**7), _int(body, "seed", 0, 0, MAX_SEED))


def _gaussian(info: RunInfo, what: str) -> None:
    if not method_class(info.method).denoises:
        raise BadRequest(f"{what} needs a Gaussian run (deterministic DDIM); this one is {info.method}")


# --- the edit and few-step panels ---------------------------------------------------------------------
MAX_EDITS = 16  # edits of one image per request
MAX_RESAMPLE = 20  # RePaint passes over each jump (the paper's 10)
FEW_STEP_BUDGETS = (1, 2, 4, 6, 10)  # network evaluations per sample the few-step panel draws at unless told
MAX_BUDGET = 100


def _base64(body: dict, key: str, max_bytes: int) -> bytes | None:
    """The bytes of ``body[key]``, a data URL or base64 text of at most ``max_bytes`` bytes (None when absent)."""
    import base64
    import binascii

    text = body.get(key)
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadRequest(f"the {key} must be a data URL or base64 text")
    text = text.split(",", 1)[1] if text.startswith("data:") else text
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise BadRequest(f"the {key} is over {max_bytes / 2**20:.0f} MiB")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"the {key} is not valid base64") from None


def _mask(raw: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """A painted mask's PNG as bool [H, W] (white: repaint): exactly the run's size, read from its header before
    any pixel is decoded, and with at least one white pixel."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    _, h, w = shape
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                raise BadRequest(f"the mask must be a PNG, got {im.format}")
            if im.size != (w, h):
                raise BadRequest(f"the mask is {im.width}x{im.height} pixels; this run's images are {w}x{h}: paint it "
                                 "on the page's canvas, which has the run's size")
            painted = np.asarray(im.convert("L")) >= 128
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"cannot read the mask as a PNG ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not painted.any():
        raise BadRequest("the mask has no white pixel: paint the region to repaint, or send no mask for SDEdit")
    return torch.from_numpy(painted.copy())


def _editable(info: RunInfo) -> None:
    if info.kind != "run":
        raise BadRequest(f"editing needs a difflab run; {info.name} is a diffusers folder")
    if not method_class(info.method).denoises:
        raise BadRequest(f"editing needs a Gaussian run (a denoiser to edit with); this one is {info.method}")


@dataclass(frozen=True)
class EditRequest:
    """Edits ``start .. start + n - 1`` of one image (uploaded, fitted to the run, or dataset image ``index``), as
    :meth:`difflab.Model.edit` draws them: SDEdit at ``strength``, or with a ``mask`` (bool [H, W], True:
    repaint) RePaint with ``jump_length`` and ``resample``."""

    run: str
    n: int
    start: int
    seed: int
    sampler: str | None  # None: the run's own
    steps: int
    guidance: float | None
    label: int | None  # None: class runs cycle through their classes
    prompt: str | None
    strength: float
    jump_length: int
    resample: int | None  # None: Model.edit's default
    index: int | None
    image: torch.Tensor | None  # uint8 [C, H, W], fitted to the run
    mask: torch.Tensor | None

    @classmethod
    def from_json(cls, body: dict, info: RunInfo, max_bytes: int) -> EditRequest:
        from difflab.data.upload import decode_image_bytes

        _editable(info)
        one = sample_request({**body, "count": body.get("count", 4)}, info)
        if one.n > MAX_EDITS:
            raise BadRequest(f"count must be between 1 and {MAX_EDITS} edits, got {one.n}")
        strength = _float(body, "strength", 0.5, 0.0, 1.0)
        if strength == 0:
            raise BadRequest("strength must be in (0, 1]: 0 gives the image back unchanged, 1 a fresh sample")
        raw, index = _base64(body, "image", max_bytes), body.get("index")
        if (raw is None) == (index is None):
            raise BadRequest("give either an uploaded image or a dataset index")
        image = None
        if raw is not None:
            try:  # decoded here, so that a bad file is a 400 before any work is queued
                image = decode_image_bytes(raw, info.shape, max_bytes=max_bytes)
            except UsageError as e:
                raise BadRequest(str(e)) from e
        mask = _base64(body, "mask", max_bytes)
        return cls(info.name, one.n, one.start, one.seed, one.sampler, one.steps, one.guidance,
                   None if body.get("label") is None else int(one.labels[0]), one.prompt, strength,
                   _int(body, "jump_length", 10, 1, info.max_steps),
                   None if body.get("resample") is None else _int(body, "resample", 1, 1, MAX_RESAMPLE),
                   None if index is None else _int(body, "index", 0, 0, 10**7), image,
                   None if mask is None else _mask(mask, info.shape))


@dataclass(frozen=True)
class FewStepRequest:
    """The same seeds drawn within each of ``budgets`` network evaluations per sample, by each of ``samplers``
    (None: the run's own), each at the most steps its budget allows."""

    base: SampleRequest  # the seeds, count and condition; its sampler and steps are set per cell
    samplers: tuple[str | None, ...]
    budgets: tuple[int, ...]

    @classmethod
    def from_json(cls, body: dict, info: RunInfo) -> FewStepRequest:
        base = sample_request({k: v for k, v in {**body, "count": body.get("count", 4)}.items()
                               if k not in ("sampler", "steps")}, info)
        if base.n > 16:
            raise BadRequest(f"count must be between 1 and 16 for the few-step panel, got {base.n}")
        budgets = body.get("budgets", list(FEW_STEP_BUDGETS))
        if not isinstance(budgets, list) or not 1 <= len(budgets) <= 8:
            raise BadRequest("budgets must be a list of 1 to 8 numbers of network evaluations")
        budgets = sorted({_int({"budgets": b}, "budgets", None, 1, MAX_BUDGET) for b in budgets})
        samplers = body.get("samplers", [None])
        if not isinstance(samplers, list) or not 1 <= len(samplers) <= 6:
            raise BadRequest("samplers must be a list of 1 to 6 sampler names (null: the run's own)")
        chosen = tuple(dict.fromkeys(sample_request({"sampler": s}, info).sampler for s in samplers))
        return cls(base, chosen, tuple(budgets))
