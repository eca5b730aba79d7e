"""``python -m clip_jax.convert``: the flags, and errors printed as one line (exit 2)."""

from __future__ import annotations

import argparse

from clip_jax import cli
from clip_jax.convert.export_hf import export_hf
from clip_jax.convert.load import FORMATS, convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clip_jax.convert",
        description="Convert OpenAI / OpenCLIP / Hugging Face CLIP checkpoints to clip_jax "
        "(or a clip_jax checkpoint to a Hugging Face CLIPModel with --to=hf).",
    )
    p.add_argument("--source", required=True, help="checkpoint file or folder")
    p.add_argument("--format", choices=FORMATS, help="layout of --source (not with --to=hf)")
    p.add_argument("--model", default=None, help="OpenCLIP model name or model-config JSON")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--to", choices=("clip_jax", "hf"), default="clip_jax")
    args = p.parse_args(argv)
    if args.to != "hf" and not args.format:
        p.error("--format is required (openai, open_clip or hf)")
    if args.to != "hf" and args.format == "open_clip" and not args.model:
        p.error("--format=open_clip needs --model (e.g. ViT-B-32 or ViT-B-32-quickgelu)")

    def body():
        if args.to == "hf":
            out = export_hf(args.source, args.output)
        else:
            out = convert(args.source, args.format, args.output, args.model)
        print(f"wrote {out}")

    return cli.run(body, prefix="convert: error")
