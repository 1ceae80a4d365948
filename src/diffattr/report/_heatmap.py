"""NDA heatmaps as figures: an image in grey with its attribution map overlaid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffattr._config import is_int
from diffattr._io import atomic_write
from diffattr.errors import ConfigError, DataError


def save_heatmap(
    image: torch.Tensor,
    heat: np.ndarray,
    path: str | os.PathLike[str],
    scale: int = 8,
) -> Path:
    """Write a PNG of ``image`` in grey with ``heat`` overlaid ('inferno', blended at 0.5).

    Args:
        image: (C, H, W) in [-1, 1]; colour images are shown as the mean of their channels.
        heat: (H, W) non-negative map, e.g. from :func:`diffattr.methods.nda_heatmaps`; shown
            relative to its maximum.
        path: Where to write the PNG (parent folders are created).
        scale: Nearest-neighbour upscaling factor; the PNG is (H * scale, W * scale).

    Returns:
        The path written.

    Raises:
        DataError: ``image`` is not (C, H, W) or ``heat`` is not (H, W) and finite.
        ConfigError: ``scale`` is not an int >= 1.
    """
    from matplotlib import colormaps
    from PIL import Image

    if not is_int(scale) or scale < 1:
        raise ConfigError(f"scale={scale!r} is invalid: must be an int >= 1")
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise DataError(f"image must be a (C, H, W) tensor, found {getattr(image, 'shape', image)}")
    heat = np.asarray(heat, dtype=np.float64)
    if heat.shape != tuple(image.shape[1:]) or not np.isfinite(heat).all():
        raise DataError(
            f"heat must be a finite array of shape {tuple(image.shape[1:])}, found {heat.shape}"
        )
    grey = ((image.detach().double().cpu().mean(0).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
    peak = heat.max()
    level = heat / peak if peak > 0 else np.zeros_like(heat)
    colour = colormaps["inferno"](level.clip(0.0, 1.0))[..., :3]
    blended = 0.5 * grey[..., None] + 0.5 * colour
    pixels = np.round(blended * 255).astype(np.uint8)
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    path = Path(path)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return path
