"""Helpers shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffattr.data import ImageDataset


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None, **save_args) -> Path:
    """Write ``pixels`` ((H, W) or (H, W, C) array) with Pillow, format from the suffix."""
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, **save_args)
    return path


def make_dataset(
    n: int = 12, channels: int = 1, size: int = 4, first_id: int = 100
) -> ImageDataset:
    """A small in-memory dataset whose ids are not positions, to catch id/position mix-ups."""
    images = torch.linspace(-1, 1, n * channels * size * size).reshape(n, channels, size, size)
    return ImageDataset(
        images=images,
        ids=np.arange(first_id, first_id + 3 * n, 3, dtype=np.int64),
        name="toy",
        labels=np.arange(n, dtype=np.int64) % 3,
    )
