"""difflab export: a trained run as a diffusers pipeline folder (Hub layout, model card, safetensors)."""

from __future__ import annotations

import argparse

from difflab.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'difflab train'")
    p.add_argument("--to", nargs=2, metavar=("FORMAT", "OUT"), required=True,
                   help="'diffusers OUT': a folder DDPMPipeline/DDIMPipeline.from_pretrained(OUT) loads")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--license", default=None, help="the model card's license (a Hub id: mit, cc-by-4.0, other, ...; "
                   "default: the data set's where difflab knows it, else unknown)")


def run(args: argparse.Namespace) -> int:
    from difflab.interop.export import export_diffusers

    fmt, out = args.to
    if fmt != "diffusers":
        raise UsageError(f"unknown export format '{fmt}'; difflab exports to: diffusers")
    path = export_diffusers(args.run, out, ema=not args.no_ema, license=args.license)
    print(f"diffusers pipeline: {path} (DDPMPipeline.from_pretrained('{path}'); "
          f"upload with huggingface_hub.upload_folder)")
    return 0
