"""Render scikit-learn's handwritten digits as PNG files in class folders: real images on disk for data.name=images.

    python examples/images/render_digits.py data/digits-png [--size 64] [--limit N]

writes data/digits-png/train/<digit>/<n>.png and data/digits-png/eval/<digit>/<n>.png (the built-in digits'
own 80/20 split), each 8x8 scan upscaled to SIZE x SIZE grayscale with bicubic interpolation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def render(out: Path, size: int = 64, limit: int = 0) -> int:
    """Write the PNGs; returns how many were written. Refuses a directory that already holds images."""
    from PIL import Image

    from distrain.data import build_datasets

    if any(out.glob("*/*/*.png")):
        raise SystemExit(f"{out} already holds rendered digits; nothing is overwritten. Choose another directory.")
    train, evaluation = build_datasets("digits", {}, 0.2)
    written = 0
    for split, data in (("train", train), ("eval", evaluation)):
        count = len(data) if not limit else min(limit, len(data))
        for i in range(count):
            pixels = (data.inputs[i, 0].numpy() * 255).astype(np.uint8)
            folder = out / split / str(int(data.targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to create (e.g. data/digits-png)")
    parser.add_argument("--size", type=int, default=64, help="pixels per side of each PNG (default 64)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images per split (default: all)")
    args = parser.parse_args()
    n = render(args.out, args.size, args.limit)
    print(f"wrote {n} PNG files to {args.out}/train and {args.out}/eval")


if __name__ == "__main__":
    main()
