from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffattr._io import atomic_write
from diffattr.errors import DataError

__all__ = ["image_grid", "save_grid", "save_pngs", "to_uint8"]

_GRID_PAD_VALUE = 255  # white separators stand out against the black background of digits


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert images in [-1, 1] to 8-bit pixels.

    Args:
        images: ``(N, C, H, W)`` tensor with C in {1, 3}, on any device; values outside [-1, 1]
            (e.g. raw model samples) are clamped.

    Returns:
        ``(N, H, W, C)`` uint8 array, with -1 -> 0 and 1 -> 255, rounded to nearest.

    Raises:
        DataError: If ``images`` is not a 4-D tensor with 1 or 3 channels.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        found = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise DataError(f"images must be an (N, C, H, W) tensor with C in {{1, 3}}, found {found}")
    pixels = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _pil_image(pixels: np.ndarray) -> Image.Image:
    """Return an "L" or "RGB" Pillow image for an (H, W, C) uint8 array."""
    return Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)


def _write_png(pixels: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: _pil_image(pixels).save(tmp, format="PNG"))


def save_pngs(
    images: torch.Tensor, directory: str | os.PathLike[str], names: list[str]
) -> list[Path]:
    """Save each image as its own PNG file (grayscale "L" for 1 channel, "RGB" for 3).

    Args:
        images: ``(N, C, H, W)`` tensor in [-1, 1].
        directory: Folder to write to; created if missing.
        names: N distinct file names; ``.png`` is appended to names without it.

    Returns:
        The paths written, in the order of ``images``.

    Raises:
        DataError: If the images are malformed, or ``names`` has the wrong length, repeats a
            name or holds a path rather than a plain file name.
    """
    pixels = to_uint8(images)
    if len(names) != len(pixels):
        raise DataError(f"got {len(names)} names for {len(pixels)} images")
    file_names = [name if name.lower().endswith(".png") else f"{name}.png" for name in names]
    for name in file_names:
        if Path(name).name != name:
            raise DataError(f"image name {name!r} must be a plain file name, not a path")
    if len(set(file_names)) != len(file_names):
        raise DataError("image names must be distinct")
    directory = Path(directory)
    paths = [directory / name for name in file_names]
    for image, path in zip(pixels, paths, strict=True):
        _write_png(image, path)
    return paths


def image_grid(
    images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1
) -> np.ndarray:
    """Tile images into one picture, for looking at samples and attributed training images.

    Args:
        images: ``(N, C, H, W)`` tensor in [-1, 1].
        nrow: Images per row (as in torchvision's ``make_grid``); None uses ``ceil(sqrt(N))``.
        pad: White pixels between images and around the border, after scaling.
        scale: Nearest-neighbour upscaling factor, so 8x8 digits are visible.

    Returns:
        ``(H', W', C)`` uint8 array with ``H' = rows * (H * scale + pad) + pad`` and likewise
        ``W'`` for ``min(nrow, N)`` columns.

    Raises:
        DataError: If the images are malformed or empty, or an argument is out of range.
    """
    pixels = to_uint8(images)
    n, height, width, channels = pixels.shape
    if n == 0:
        raise DataError("image_grid needs at least one image")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1 or pad < 0 or scale < 1:
        raise DataError(f"need nrow >= 1, pad >= 0, scale >= 1; got {nrow=}, {pad=}, {scale=}")
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    cell_h, cell_w = height * scale + pad, width * scale + pad
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full((rows * cell_h + pad, cols * cell_w + pad, channels), _GRID_PAD_VALUE, np.uint8)
    for index, image in enumerate(pixels):
        top, left = (index // nrow) * cell_h + pad, (index % nrow) * cell_w + pad
        grid[top : top + height * scale, left : left + width * scale] = image
    return grid


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    scale: int = 4,
) -> Path:
    """Save :func:`image_grid` of ``images`` as a PNG file.

    Args:
        images: ``(N, C, H, W)`` tensor in [-1, 1].
        path: Output file; parent folders are created.
        nrow: Images per row; None uses ``ceil(sqrt(N))``.
        scale: Nearest-neighbour upscaling factor.

    Returns:
        The path written.

    Raises:
        DataError: If the images are malformed or an argument is out of range.
    """
    path = Path(path)
    _write_png(image_grid(images, nrow=nrow, scale=scale), path)
    return path
