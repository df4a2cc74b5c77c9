"""Render scikit-learn's handwritten digits as PNG files in class folders: real images on disk for data.name=images.

    python examples/images/render_digits.py data/digits-png [--size 64] [--limit N]

writes data/digits-png/train/<digit>/<n>.png and data/digits-png/eval/<digit>/<n>.png (the built-in digits'
own 80/20 split), each 8x8 scan upscaled to SIZE x SIZE grayscale with bicubic interpolation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distrain.data.datasets import render_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to create (e.g. data/digits-png)")
    parser.add_argument("--size", type=int, default=64, help="pixels per side of each PNG (default 64)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images per split (default: all)")
    args = parser.parse_args()
    n = render_digits(args.out, args.size, args.limit)
    print(f"wrote {n} PNG files to {args.out}/train and {args.out}/eval")


if __name__ == "__main__":
    main()
