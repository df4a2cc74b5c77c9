"""Images on disk, one folder per class (``ROOT/<class>/*.png``), decoded with Pillow and augmented with torch ops.

Each sample is decoded, resized and (training split only) augmented when it is fetched, so the work runs in the
DataLoader workers. The augmentation draws from ``distrain.data.sample_rng()``: sample i of step s is transformed
the same way at any world size and with any number of workers. No torchvision: Pillow decodes, torch transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distrain.data.seeding import fetch_context, sample_rng
from distrain.errors import ConfigError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EVAL_DIRS = ("eval", "val", "validation", "test")


@dataclass(frozen=True)
class Augment:
    """Random per-sample transforms (all off at 0): an affine warp, a horizontal flip, brightness and contrast."""

    rotate: float = 0.0  # degrees, drawn uniformly from [-rotate, rotate]
    translate: float = 0.0  # fraction of the image size, per axis
    scale: float = 0.0  # zoom drawn from [1 - scale, 1 + scale]
    flip: bool = False  # mirror left-right with probability 1/2
    brightness: float = 0.0  # add a value from [-brightness, brightness]
    contrast: float = 0.0  # scale around the mean by [1 - contrast, 1 + contrast]

    @classmethod
    def from_kwargs(cls, kwargs: Optional[Dict[str, Any]]) -> Optional["Augment"]:
        if not kwargs:
            return None
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(f"data.kwargs.augment.{unknown[0]} is not an augmentation; allowed: "
                              f"{', '.join(allowed)}.", key=f"data.kwargs.augment.{unknown[0]}")
        return cls(**kwargs)

    def __call__(self, image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        u = torch.rand(7, generator=rng) * 2 - 1  # seven uniform draws in [-1, 1], always all seven
        angle = math.radians(self.rotate) * float(u[0])
        zoom = 1.0 + self.scale * float(u[1])
        tx, ty = 2 * self.translate * float(u[2]), 2 * self.translate * float(u[3])
        if self.rotate or self.scale or self.translate:
            cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
            theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=image.dtype).unsqueeze(0)
            grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
            image = F.grid_sample(image.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False).squeeze(0)
        if self.flip and float(u[4]) > 0:
            image = image.flip(-1)
        if self.contrast:
            mean = image.mean()
            image = (image - mean) * (1.0 + self.contrast * float(u[5])) + mean
        if self.brightness:
            image = image + self.brightness * float(u[6])
        return image


def decode(path: Path, size: int, channels: int) -> torch.Tensor:
    """The image at ``path`` as a float tensor (channels, size, size) in [0, 1]."""
    from PIL import Image  # lazy: optional: Pillow is optional (distrain[data])

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """(image, class) samples of image files; decoded, resized and augmented per sample when fetched."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str], size: int,
                 channels: int, augment: Optional[Augment] = None, spec: Any = None):
        self.files, self.labels, self.classes = list(files), list(labels), list(classes)
        self.size, self.channels, self.augment, self.spec = size, channels, augment, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image = decode(self.files[i], self.size, self.channels)
        if self.augment is not None:
            # outside the loader (an inference, a FLOP count) there is no step to seed from: no augmentation
            rng = sample_rng() if fetch_context() is not None else None
            if rng is not None:
                image = self.augment(image, rng)
        return image, self.labels[i]


def scan(root: Path) -> Tuple[List[Path], List[int], List[str]]:
    """(files, labels, class names) of ``root/<class>/...`` (classes and files sorted by name)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: List[Path] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in SUFFIXES and f.is_file():
                files.append(f)
                labels.append(label)
    return files, labels, classes
