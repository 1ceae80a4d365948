"""Size arguments shared by the loaders, and tensor resizing for array-backed datasets."""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from diffattr.errors import DataError

Size = int | tuple[int, int]


def is_positive_int(value: object) -> bool:
    """Return whether ``value`` is an int (not a bool) above zero."""
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) > 0


def parse_size(size: object) -> tuple[int, int] | None:
    """Return ``size`` as ``(height, width)``: an int means a square; None means keep the size."""
    if size is None:
        return None
    if is_positive_int(size):
        return int(size), int(size)
    # Lists come back from JSON sources, so accept them as well as tuples.
    if isinstance(size, tuple | list) and len(size) == 2 and all(map(is_positive_int, size)):
        return int(size[0]), int(size[1])
    raise DataError(f"size must be a positive int or a (height, width) pair, got {size!r}")


def size_record(size: tuple[int, int] | None) -> int | list[int] | None:
    """Return a parsed size in the JSON form stored in ``ImageDataset.source``."""
    if size is None:
        return None
    return size[0] if size[0] == size[1] else list(size)


def resize_images(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images in [-1, 1] with antialiased bilinear interpolation.

    Antialiasing matters when shrinking; the clamp only removes float rounding past ±1.
    """
    if size is None or tuple(images.shape[2:]) == size:
        return images
    resized = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(-1.0, 1.0).contiguous()
