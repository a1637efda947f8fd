"""The quality race: difflab's defaults against diffusers' (and lucidrains') recipes, each trained for the
same wall-clock minutes on the same machine one after the other, judged by one MNIST classifier.

    python bench/quality_race.py --minutes 10                       # the unconditional race
    python bench/quality_race.py --only class --class-minutes 12    # class-conditional, guidance 3
    python bench/quality_race.py --only naive2 --naive2-minutes 8   # part 1, denoise then renoise
    python bench/quality_race.py --only steps --run runs/race/difflab   # quality against NFE
    python bench/quality_race.py --data textures --image-size 32 --minutes 10 --n 2000 --peer-n 500   # colour
    python bench/quality_race.py --data textures --baseline /work/wt/base135 ...   # and an earlier checkout
    python bench/quality_race.py --data emoji --only difflab --difflab-flags=--hflip ...   # a choice against the defaults

Contestants (``--only`` picks some; default ``difflab,diffusers,lucidrains``):

- ``difflab``: ``difflab train --data mnist --time-limit M`` with no other flag, then the run's own default
  sampler (what ``difflab sample`` uses without flags).
- ``diffusers``: ``UNet2DModel`` (1.7M parameters: blocks 32/64/64, two layers each, attention at 16 and 8)
  + ``DDPMScheduler`` (linear betas, eps), AdamW 1e-3, gradient clipping 1.0, ``EMAModel`` 0.999, batch 64,
  MNIST padded to 32x32; sampled with ``DDIMScheduler`` (its defaults, clip_sample on) in 100 steps.
- ``lucidrains``: ``denoising_diffusion_pytorch.GaussianDiffusion`` (v-prediction, sigmoid schedule),
  Adam 3.2e-4, EMA 0.995, when installed (``pip install --no-deps denoising-diffusion-pytorch einops ema-pytorch
  accelerate``; its torchvision import is satisfied by a stand-in, see ``_import_lucidrains``); else reported
  as not installable.
- ``class``: ``difflab train --data mnist --conditioning class --time-limit M``, sampled with ``--guidance 3``
  and each digit asked for in turn: the fraction the classifier gives the asked-for digit.
- ``naive2``: ``difflab train --data mnist --method naive2 --time-limit M`` and its own sampler.
- ``steps``: confident fraction and classifier FID against the number of network evaluations (NFE) for the
  run's default sampler and each few-step sampler, from one trained run (``--run``, or the difflab contestant's).

The judge is difflab's own small MNIST classifier (``difflab.evaluate.classifier``, trained once and cached;
about 99% test accuracy): the fraction of samples it labels with softmax confidence above 0.9 ("confident"),
the count of the rarest digit among the confident ones, and the Frechet distance of its 128-d features to the
MNIST test split over ``--fid-n`` samples ("classifier FID", comparable only within difflab). The peers are
judged on ``--peer-n`` samples (FID over the same): their samplers take 100 and 250 steps of networks that run
slower than difflab's on a CPU, and 2,000 of them take hours. The last line is
``ratio=X``: difflab's confident fraction over the best peer's. Every number goes to ``--json``.

Colour mode (``--data emoji``, ``textures`` or a folder, ``--image-size`` to resize): the same three contestants on
those images (difflab: ``difflab train --data DATA`` with ``--image-size`` when given and nothing else; the peers'
networks take the data's channels and size, and they train with random horizontal flips, as their example
scripts do), judged by Inception KID over all their samples (FID too from 2,000 samples) against the training
images (``--reference-n`` of them) and by the colour statistics of ``difflab.evaluate.colour`` (mean saturation,
brightness, hue sixths of the saturated pixels) against the training images'. The held-out images (the test
split, when the data has one) are judged the same way as a yardstick. The last line is ``ratio=X``: difflab's
KID over the best peer's (lower is better); the JSON goes to bench/results/ unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import cpu_description, quiet_diffusers, write_json  # (also puts src/ on the path)

ROOT = Path(__file__).resolve().parents[1]
FEWSTEP = ("ddim", "heun", "dpmpp-2m", "dpmpp-3m", "unipc", "dpmpp-2m-sde")
NFES = (4, 6, 8, 10, 20, 50, 100)


# --- the judge ------------------------------------------------------------------------------------------
class Judge:
    """The MNIST classifier and the test split's feature statistics, loaded once."""

    def __init__(self, device: torch.device):
        from difflab.data import load
        from difflab.evaluate.classifier import load_or_train_classifier

        self.device = device
        self.model, meta = load_or_train_classifier("mnist", pad_to=32, device=device)
        self.accuracy = meta["test_accuracy"]
        self.test = load("mnist", split="test", pad_to=32).images
        self._ref = None

    @torch.no_grad()
    def _logits_and_features(self, images: torch.Tensor):
        logits, feats = [], []
        for i in range(0, len(images), 512):
            x = images[i:i + 512].to(self.device).float() / 127.5 - 1
            f = self.model.penultimate(x)
            feats.append(f.cpu().double())
            logits.append(self.model.head(f).cpu())
        return torch.cat(logits), torch.cat(feats).numpy()

    def judge(self, images: torch.Tensor, labels: torch.Tensor | None = None, fid_n: int = 0) -> dict:
        """confident fraction, rarest digit, class histogram, accuracy (with labels), classifier FID."""
        from difflab.evaluate.metrics import fid

        self.model.eval()
        logits, feats = self._logits_and_features(images)
        prob = logits.softmax(1)
        conf = prob.max(1).values > 0.9
        counts = torch.bincount(prob.argmax(1)[conf], minlength=10)
        out = {"n": len(images), "confident": float(conf.double().mean()), "rarest": int(counts.min()),
               "rarest_fraction": float(counts.min()) / len(images), "histogram": counts.tolist()}
        if labels is not None:
            out["accuracy"] = float((prob.argmax(1) == labels).double().mean())
        if fid_n:
            if self._ref is None:
                self._ref = self._logits_and_features(self.test)[1]
            out["classifier_fid"] = fid(feats[:fid_n], self._ref)
            out["fid_n"] = min(fid_n, len(images))
        return out

class ColourJudge:
    """Colour mode's judge: Inception KID (and FID from ``fid_min`` samples or more) against the training images
    (a seeded ``reference_n`` of them when given; their Inception features are cached), and the colour statistics
    of :mod:`difflab.evaluate.colour` against those of every training image."""

    def __init__(self, train, reference_n: int | None, fid_min: int = 2000):
        from difflab.evaluate.colour import colour_stats

        self.colours = colour_stats(train.images)
        if reference_n is not None and reference_n < len(train):
            train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:reference_n])
        self.reference, self.fid_min = train, fid_min

    def judge(self, images: torch.Tensor) -> dict:
        """KID (x 1e3 as ``kid_e3`` too), FID when there are enough samples, the colour comparison."""
        from difflab.evaluate import evaluate_images
        from difflab.evaluate.colour import compare

        metrics = ["kid", *(["fid"] if len(images) >= self.fid_min else [])]
        r = evaluate_images(images, None, self.reference, metrics, "inception", batch_size=64)
        return {"n": len(images), "kid": r["kid"], "kid_std": r["kid_std"], "kid_e3": 1e3 * r["kid"], "fid": r.get("fid"),
                "reference_n": len(self.reference), "colour": compare(images, self.colours), "warnings": r["warnings"]}


# --- contestants ----------------------------------------------------------------------------------------
def _difflab(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "difflab", *args], check=True, env=env)


def train_difflab(out: Path, minutes: float, *flags: str, data: str = "mnist") -> dict:
    """``difflab train --data DATA --time-limit M`` plus ``flags`` (none for the default contestant)."""
    t0 = time.monotonic()
    _difflab("train", "--data", data, "--time-limit", str(minutes), "--out", str(out), "--quiet", *flags)
    cfg = json.loads((out / "config.json").read_text())
    return {"train_seconds": time.monotonic() - t0, "steps": _last_step(out),
            "recipe": {k: cfg[k] for k in ("prediction", "process", "lr", "warmup", "precision", "sampler",
                                           "sample_steps", "clip", "batch_size") if k in cfg}
            | {k: cfg[k] for k in ("ema_length", "ema_decay") if k in cfg}}


def sample_difflab(run_dir: Path, n: int, **kw) -> tuple[torch.Tensor, float]:
    from difflab.runs.draw import load_run

    run = load_run(run_dir)
    t0 = time.monotonic()
    images = run.sample(n, seed=0, **kw)
    return images, time.monotonic() - t0


def _export_folder(images: torch.Tensor, folder: Path) -> Path:
    """``images`` (uint8 [N, C, S, S]) as numbered PNGs in ``folder`` (written once, atomically), for a contestant
    that reads folders only: a baseline checkout from before the built-in colour sets."""
    from difflab.files import atomic_folder
    from difflab.outputs import save_sample_pngs

    if not folder.is_dir():
        atomic_folder(folder, lambda tmp: save_sample_pngs(images, tmp, {"exported_for": "the colour race"}))
    return folder


def _last_step(run_dir: Path) -> int:
    """The step of the last row of a run's loss.csv."""
    return int((run_dir / "loss.csv").read_text().strip().splitlines()[-1].split(",")[0])


def race_baseline(checkout: Path, out: Path, minutes: float, n: int, data: str) -> tuple[torch.Tensor, dict]:
    """An earlier difflab (a checkout, ``git worktree add DIR COMMIT``) with its own defaults: ``difflab train
    --data DATA --time-limit M`` and ``difflab.load(run).sample(n, seed=0)``, both run from that checkout."""
    import numpy as np

    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "difflab", "train", "--data", data, "--time-limit", str(minutes), "--out",
                    str(out), "--quiet"], check=True, env=env)
    train_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    code = ("import sys, numpy, difflab; numpy.save(sys.argv[2], "
            "difflab.load(sys.argv[1]).sample(int(sys.argv[3]), seed=0).numpy())")
    subprocess.run([sys.executable, "-c", code, str(out), str(out / "samples.npy"), str(n)], check=True, env=env)
    images = torch.from_numpy(np.load(out / "samples.npy", allow_pickle=False))
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return images, {"checkout": str(checkout), "commit": commit, "train_seconds": train_seconds,
                    "steps": _last_step(out), "sample_seconds": time.monotonic() - t0}


def diffusers_unet(channels: int = 1, size: int = 32):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(32, 64, 64),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)


def _batch(data: torch.Tensor, size: int, flips: bool) -> torch.Tensor:
    """``size`` random training images (uint8), each flipped left-right with probability 1/2 when ``flips``."""
    x = data[torch.randint(0, len(data), (size,))]
    if flips:
        x = torch.where(torch.rand(size, 1, 1, 1) < 0.5, x.flip(3), x)
    return x


def _mnist() -> torch.Tensor:
    from difflab.data import load

    return load("mnist", pad_to=32).images


def race_diffusers(minutes: float, n: int, seed: int = 0, data: torch.Tensor | None = None,
                   flips: bool = False) -> tuple[torch.Tensor, dict]:
    """diffusers' unconditional recipe (its train_unconditional example's loop), time-limited, then DDIM-100, on
    ``data`` (uint8 [N, C, S, S]; default MNIST padded to 32), with random horizontal flips when ``flips``."""
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.training_utils import EMAModel

    quiet_diffusers()
    torch.manual_seed(seed)
    data = _mnist() if data is None else data
    unet = diffusers_unet(data.shape[1], data.shape[-1])
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMAModel(unet.parameters(), decay=0.999)
    sched = DDPMScheduler(num_train_timesteps=1000)
    t0, steps, deadline = time.monotonic(), 0, time.monotonic() + minutes * 60
    unet.train()
    while time.monotonic() < deadline:
        x = _batch(data, 64, flips).float() / 127.5 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (64,))
        loss = F.mse_loss(unet(sched.add_noise(x, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        steps += 1
    train_seconds = time.monotonic() - t0
    ema.copy_to(unet.parameters())
    unet.eval()
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(100)
    g = torch.Generator().manual_seed(seed)
    out, t1 = [], time.monotonic()
    with torch.no_grad():
        for lo in range(0, n, 256):
            x = torch.randn(min(256, n - lo), *data.shape[1:], generator=g)
            for t in ddim.timesteps:
                x = ddim.step(unet(x, t).sample, t, x).prev_sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out), {"steps": steps, "train_seconds": train_seconds, "sample_seconds": time.monotonic() - t1,
                            "sampler": "DDIMScheduler, 100 steps", "parameters": sum(p.numel() for p in unet.parameters())}


def _import_lucidrains():
    """``denoising_diffusion_pytorch``'s GaussianDiffusion and Unet. Its package imports torchvision at the top
    for its Trainer's data pipeline only, and torchvision does not work with the CPU torch wheel here: a
    stand-in module satisfies that import (the race uses neither its Trainer nor its datasets)."""
    import types

    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:
            tv = types.ModuleType("torchvision")
            for sub in ("transforms", "utils"):
                setattr(tv, sub, types.ModuleType(f"torchvision.{sub}"))
                sys.modules[f"torchvision.{sub}"] = getattr(tv, sub)
            sys.modules["torchvision"] = tv
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    return GaussianDiffusion, Unet


def race_lucidrains(minutes: float, n: int, seed: int = 0, data: torch.Tensor | None = None,
                    flips: bool = False) -> tuple[torch.Tensor | None, dict]:
    """lucidrains' recipe: Unet(dim 32, mults 1/2/2; 1.4M) in GaussianDiffusion (v-prediction, sigmoid
    schedule, its defaults), Adam 3.2e-4, ema_pytorch EMA 0.995 every 10 steps, batch 64; sampled with its
    DDIM at 250 steps (its README's setting; its default is 1000 ancestral steps). ``data`` and ``flips`` as
    in :func:`race_diffusers` (its Trainer flips by default)."""
    try:
        GaussianDiffusion, Unet = _import_lucidrains()
        from ema_pytorch import EMA
    except Exception as e:
        return None, {"skipped": f"not installable here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    torch.manual_seed(seed)
    data = _mnist() if data is None else data
    model = GaussianDiffusion(Unet(dim=32, dim_mults=(1, 2, 2), channels=data.shape[1], flash_attn=False),
                              image_size=data.shape[-1],
                              timesteps=1000, sampling_timesteps=250, objective="pred_v", beta_schedule="sigmoid")
    opt = torch.optim.Adam(model.parameters(), lr=3.2e-4, betas=(0.9, 0.99))
    ema = EMA(model, beta=0.995, update_every=10)
    t0, steps, deadline = time.monotonic(), 0, time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        loss = model(_batch(data, 64, flips).float() / 255)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        steps += 1
    train_seconds = time.monotonic() - t0
    ema.ema_model.eval()
    out, t1 = [], time.monotonic()
    with torch.no_grad():
        for lo in range(0, n, 256):
            x = ema.ema_model.sample(batch_size=min(256, n - lo))  # in [0, 1]
            out.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out), {"steps": steps, "train_seconds": train_seconds, "sample_seconds": time.monotonic() - t1,
                            "sampler": "its DDIM, 250 steps", "parameters": sum(p.numel() for p in model.parameters())}


# --- the phases -----------------------------------------------------------------------------------------
def quality_vs_steps(run_dir: Path, judge: Judge, n: int, samplers, nfes, default_1000: bool = True) -> dict:
    """Confident fraction and classifier FID (n samples) for each sampler at each NFE (network evaluations per
    sample, as ``request_evaluations`` counts them: autoguidance, the default of unconditional runs, calls the guide
    too at the steps inside its noise interval; Heun twice a step but once at the end): the most steps within
    each NFE. The run's default sampler also without autoguidance, when it has it."""
    from difflab.runs.draw import load_run, request_evaluations
    from difflab.runs.request import SampleRequest
    from difflab.samplers import SAMPLERS

    run = load_run(run_dir)
    default = run.cfg.sampler
    guided = "autoguidance" in run.sampling_defaults()
    rows = [(s, None) for s in dict.fromkeys([default, *samplers]) if s in SAMPLERS]
    if guided:
        rows.insert(1, (default, 1.0))
    table = {}
    for sampler, autoguidance in rows:
        name = sampler + (", no autoguidance" if autoguidance == 1.0 else "")

        def cost(steps: int, sampler=sampler, autoguidance=autoguidance) -> int:
            return request_evaluations(run, SampleRequest(sampler=sampler, steps=steps, autoguidance=autoguidance))

        for nfe in [*nfes, *([1000] if default_1000 and sampler == default and autoguidance is None else [])]:
            steps = max((k for k in range(1, nfe + 1) if cost(k) <= nfe), default=0)  # the most steps within nfe
            if steps < 1:
                continue
            t0 = time.monotonic()
            images = run.sample(n, seed=0, sampler=sampler, steps=steps, autoguidance=autoguidance)
            r = judge.judge(images, fid_n=n) | {"seconds": time.monotonic() - t0, "steps": steps, "nfe": cost(steps)}
            table[f"{name}/{nfe}"] = r
            print(f"  {name:28s} NFE {nfe:4d} ({steps:3d} steps, {cost(steps)} NFE): confident {r['confident']:.3f} rarest "
                  f"{r['rarest']:3d} classifier FID {r['classifier_fid']:.2f} ({r['seconds']:.0f} s)", flush=True)
    return table


def colour_race(args, out: Path) -> int:
    """difflab's defaults (``difflab train --data DATA`` and ``--image-size`` when given) against the diffusers
    and lucidrains recipes on the same colour images for the same minutes, with the held-out images as a
    yardstick; ``ratio=X`` is difflab's KID over the best peer's (lower is better)."""
    from difflab.data import load
    from difflab.errors import DataError
    from difflab.evaluate.colour import describe
    from difflab.runs import grid_bottom

    only = set(args.only.split(","))
    if args.baseline:
        only.add("baseline")
    if only - {"difflab", "diffusers", "lucidrains", "baseline"}:
        raise SystemExit(f"--data {args.data}: the colour race has the contestants difflab, diffusers, lucidrains "
                         "and a --baseline checkout")
    try:
        train = load(args.data, image_size=args.image_size)
    except DataError as e:
        raise SystemExit(f"--data {args.data}: {e}") from None
    try:
        held_out = load(args.data, split="test", image_size=args.image_size)
    except DataError:
        held_out = None
    size = f"{train.height}px"
    out = out / f"{Path(args.data).name}-{size}-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run folder for each race
    print(f"# colour race on {args.data} ({len(train)} training images, {'x'.join(map(str, train.shape))}), "
          f"{args.minutes:g} minutes each, on {cpu_description()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    judge = ColourJudge(train, args.reference_n)
    results: dict = {"cpu": cpu_description(), "data": args.data, "shape": list(train.shape), "minutes": args.minutes,
                     "runs": str(out), "train_colours": judge.colours}

    def report(name: str, images: torch.Tensor, info: dict) -> None:
        r = results[name] = judge.judge(images) | info
        fid = f", FID {r['fid']:.1f} ({r['n']})" if r["fid"] is not None else ""
        steps = f"; {r['steps']} steps in {r['train_seconds'] / 60:.1f} min" if "steps" in r else ""
        if r.get("grid_bottom"):
            steps += f"; grid bottom sigma {r['grid_bottom']['sigma_min']:.3g}"
        print(f"{name}: KID x 1e3 {r['kid_e3']:.1f} +- {1e3 * r['kid_std']:.1f} ({r['n']} samples){fid}; "
              f"{describe(r['colour'])}{steps}", flush=True)

    if held_out is not None:  # a seeded subset: a split may be ordered by source (textures: by photo)
        pick = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))[:max(args.n, args.fid_n)]
        report("held-out", held_out.images[pick], {"split": "test"})
    peer_data = dict(data=train.images, flips=True)
    if "difflab" in only:
        flags = [*(("--image-size", str(args.image_size)) if args.image_size else ()), *shlex.split(args.difflab_flags)]
        info = train_difflab(out / "difflab", args.minutes, *flags, data=args.data) | {"flags": flags}
        info["grid_bottom"] = grid_bottom.load(out / "difflab")  # the sigma_min the rule chose when training ended
        images, secs = sample_difflab(out / "difflab", max(args.n, args.fid_n))
        report("difflab", images, info | {"sample_seconds": secs})
    if "baseline" in only:  # trains on the same pixels, from a folder of PNGs when DATA is a built-in set
        folder = Path(args.data) if Path(args.data).is_dir() and not args.image_size else \
            _export_folder(train.images, out.parent / f"{Path(args.data).name}-{size}-train-png")
        images, info = race_baseline(Path(args.baseline), out / "baseline", args.minutes, max(args.n, args.fid_n),
                                     str(folder))
        report("baseline", images, info)
    if "diffusers" in only:
        images, info = race_diffusers(args.minutes, args.peer_n, **peer_data)
        report("diffusers", images, info)
    if "lucidrains" in only:
        images, info = race_lucidrains(args.minutes, args.peer_n, **peer_data)
        if images is None:
            results["lucidrains"] = info
            print(f"lucidrains: {info['skipped']}", flush=True)
        else:
            report("lucidrains", images, info)
    default_json = ROOT / "bench" / "results" / f"race-{Path(args.data).name}-{size}-{time.strftime('%Y-%m-%d')}.json"
    write_json(args.json or str(default_json), results)
    peers = [results[k]["kid"] for k in ("diffusers", "lucidrains") if "kid" in results.get(k, {})]
    if "difflab" in results and "kid" in results.get("baseline", {}) and results["baseline"]["kid"] > 0:
        print(f"baseline_ratio={results['difflab']['kid'] / results['baseline']['kid']:.3f} (difflab's KID over "
              f"{results['baseline']['commit']}'s)")
    if "difflab" in results and peers:
        best = min(peers)  # KID is unbiased and can dip below 0 for a peer as good as the data: no ratio then
        print(f"ratio={results['difflab']['kid'] / best:.3f}" if best > 0 else
              f"ratio=n/a (best peer KID {best:.2g} <= 0, difflab {results['difflab']['kid']:.2g})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes of each unconditional contestant")
    p.add_argument("--class-minutes", type=float, default=12.0)
    p.add_argument("--naive2-minutes", type=float, default=8.0)
    p.add_argument("--only", default="difflab,diffusers,lucidrains",
                   help="comma-separated: difflab, diffusers, lucidrains, class, naive2, steps")
    p.add_argument("--n", type=int, default=256, help="samples judged per contestant")
    p.add_argument("--fid-n", type=int, default=2000, help="samples for the classifier FID (>= --n)")
    p.add_argument("--peer-n", type=int, default=256, help="samples judged (and for the FID) of each peer: their "
                   "samplers take 100 and 250 steps of a slower network")
    p.add_argument("--steps-n", type=int, default=256, help="samples per cell of the quality-vs-steps table")
    p.add_argument("--out", default="runs/race", help="folder for the runs")
    p.add_argument("--run", default=None, help="steps: the run to measure (default OUT/difflab)")
    p.add_argument("--samplers", default=",".join(FEWSTEP), help="steps: the samplers beside the run's default")
    p.add_argument("--json", default=None, help="write every number here (colour mode: bench/results/race-DATA-SIZE-DATE.json)")
    p.add_argument("--data", default="mnist", help="mnist (the classifier-judged race), or emoji, textures or a folder "
                   "of images: the colour race, judged by Inception KID and colour statistics")
    p.add_argument("--image-size", type=int, default=None, help="colour mode: the size the images are trained at "
                   "(default: the data's own)")
    p.add_argument("--baseline", default=None, help="colour mode: a checkout of an earlier difflab (git worktree add "
                   "DIR COMMIT) raced with its own defaults, on a PNG export of the same images")
    p.add_argument("--reference-n", type=int, default=None, help="colour mode: the training images the KID compares "
                   "with (a seeded subset; default all)")
    p.add_argument("--difflab-flags", default="", help="colour mode: more flags for difflab's train command, as one "
                   "string (e.g. '--hflip'), to measure a choice against the defaults")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data != "mnist":
        return colour_race(args, out)
    device = torch.device("cpu")
    print(f"# quality race on {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    judge = Judge(device)
    n_all = max(args.n, args.fid_n)
    results: dict = {"cpu": cpu_description(), "judge_test_accuracy": judge.accuracy}

    def report(name: str, r: dict) -> None:
        results[name] = r
        fid_txt = f", classifier FID {r['classifier_fid']:.2f} ({r['fid_n']})" if "classifier_fid" in r else ""
        acc = f", asked-for digit {r['accuracy']:.3f}" if "accuracy" in r else ""
        print(f"{name}: confident {r['confident']:.3f}, rarest digit {r['rarest']}/{r['n']}{acc}{fid_txt}; "
              f"{r.get('steps', '?')} steps in {r.get('train_seconds', 0) / 60:.1f} min", flush=True)

    if "difflab" in only:
        info = train_difflab(out / "difflab", args.minutes)
        images, secs = sample_difflab(out / "difflab", n_all)
        judged = judge.judge(images[:args.n])
        judged["classifier_fid"], judged["fid_n"] = judge.judge(images, fid_n=args.fid_n)["classifier_fid"], args.fid_n
        report("difflab", judged | info | {"sample_seconds": secs})
    if "diffusers" in only:
        images, info = race_diffusers(args.minutes, args.peer_n)
        report("diffusers", judge.judge(images, fid_n=args.peer_n) | info)
    if "lucidrains" in only:
        images, info = race_lucidrains(args.minutes, args.peer_n)
        if images is None:
            results["lucidrains"] = info
            print(f"lucidrains: {info['skipped']}", flush=True)
        else:
            report("lucidrains", judge.judge(images, fid_n=args.peer_n) | info)
    if "class" in only:
        info = train_difflab(out / "class", args.class_minutes, "--conditioning", "class")
        labels = torch.arange(200) % 10
        images, secs = sample_difflab(out / "class", 200, labels=labels, guidance=3.0)
        report("class", judge.judge(images, labels) | info | {"guidance": 3.0, "sample_seconds": secs})
    if "naive2" in only:
        info = train_difflab(out / "naive2", args.naive2_minutes, "--method", "naive2")
        images, secs = sample_difflab(out / "naive2", args.n)
        report("naive2", judge.judge(images) | info | {"sample_seconds": secs})
    if "steps" in only:
        run_dir = Path(args.run) if args.run else out / "difflab"
        print(f"quality against NFE, {run_dir}, {args.steps_n} samples a cell:", flush=True)
        results["steps"] = quality_vs_steps(run_dir, judge, args.steps_n, args.samplers.split(","), NFES)
    peers = [results[k]["confident"] for k in ("diffusers", "lucidrains") if "confident" in results.get(k, {})]
    write_json(args.json, results)
    if "difflab" in results and "kid" in results.get("baseline", {}) and results["baseline"]["kid"] > 0:
        print(f"baseline_ratio={results['difflab']['kid'] / results['baseline']['kid']:.3f} (difflab's KID over "
              f"{results['baseline']['commit']}'s)")
    if "difflab" in results and peers:
        best = max(peers)  # no sample of the best peer confident: the ratio is unbounded, said as such
        print(f"ratio={results['difflab']['confident'] / best:.2f}" if best > 0 else
              f"ratio=inf (difflab {results['difflab']['confident']:.3f}, no peer sample confident)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
