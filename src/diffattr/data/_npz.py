from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from diffattr._io import sha256_file
from diffattr.data._dataset import ImageDataset
from diffattr.data._resize import Size, parse_size, resize_images, size_record
from diffattr.errors import DataError

__all__ = ["load_npz"]

_LAYOUTS = ("auto", "NCHW", "NHWC")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a valid .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a valid .npz file: {err}") from err


def _to_nchw(images: np.ndarray, layout: str, path: Path) -> tuple[np.ndarray, str]:
    """Return ``images`` as (N, C, H, W) and the layout used; 3-D arrays are (N, H, W) gray."""
    if layout not in _LAYOUTS:
        raise DataError(f"layout must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
    if images.ndim == 3:
        return images[:, None], "auto"
    if images.ndim != 4:
        raise DataError(
            f"{path}: images must be (N, C, H, W), (N, H, W, C) or (N, H, W), "
            f"found shape {images.shape}"
        )
    if layout == "auto":
        first, last = images.shape[1] in (1, 3), images.shape[3] in (1, 3)
        if first == last:
            raise DataError(
                f"{path}: cannot tell the layout of images with shape {images.shape}; "
                "pass layout='NCHW' or layout='NHWC' (on the command line: --layout NCHW or "
                "--layout NHWC)"
            )
        layout = "NCHW" if first else "NHWC"
    if layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise DataError(
            f"{path}: images must have 1 or 3 channels, found {images.shape[1]} ({layout} layout)"
        )
    return images, layout


def _value_range(
    images: np.ndarray,
    value_range: Sequence[float] | None,
    stored: np.ndarray | None,
    path: Path,
) -> tuple[float, float]:
    """Return the value range: the argument, else the one stored in the file, else a default."""
    if value_range is None and stored is not None:
        value_range = stored.tolist()
    if value_range is not None:
        try:
            low, high = (float(v) for v in value_range)
        except (TypeError, ValueError) as err:
            raise DataError(f"value_range must be two numbers, got {value_range!r}") from err
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise DataError(f"value_range must be finite with low < high, got {value_range!r}")
        return low, high
    if images.dtype == np.uint8:
        return 0.0, 255.0
    low, high = float(images.min()), float(images.max())
    if low < 0:
        return -1.0, 1.0
    if high <= 1:
        raise DataError(
            f"{path}: float images in [0, 1] are ambiguous: pass value_range=(0, 1) or (-1, 1)"
        )
    raise DataError(
        f"{path}: float images with values in [{low:g}, {high:g}] need an explicit value_range, "
        "e.g. value_range=(0, 255)"
    )


def _check_finite(images: np.ndarray, path: Path) -> None:
    """Name the first image with a NaN or infinite value."""
    non_finite = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if non_finite.any():
        raise DataError(f"{path}: image {np.flatnonzero(non_finite)[0]} has NaN or inf values")


def _check_range(images: np.ndarray, low: float, high: float, path: Path) -> None:
    """Name the first image with a value outside ``[low, high]``."""
    flat = images.reshape(len(images), -1)
    mins, maxs = flat.min(axis=1), flat.max(axis=1)
    outside = np.flatnonzero((mins < low) | (maxs > high))
    if len(outside):
        index = outside[0]
        found = f"[{float(mins[index]):g}, {float(maxs[index]):g}]"
        raise DataError(
            f"{path}: image {index} has values in {found}, outside value_range ({low:g}, {high:g})"
        )


def _optional_ints(
    arrays: dict[str, np.ndarray], key: str, n: int, path: Path
) -> np.ndarray | None:
    values = arrays.get(key)
    if values is None:
        return None
    if values.ndim != 1 or len(values) != n or values.dtype.kind not in "iu":
        raise DataError(
            f"{path}: '{key}' must be {n} integers (one per image), "
            f"found shape {values.shape} and dtype {values.dtype}"
        )
    if key == "ids" and len(np.unique(values)) != n:
        raise DataError(f"{path}: 'ids' must be unique")
    if values.dtype.kind == "u" and n and values.max() > np.iinfo(np.int64).max:
        # astype(int64) would wrap these around to negative numbers.
        raise DataError(
            f"{path}: '{key}' holds {values.max()}, which does not fit a signed 64-bit integer"
        )
    return values.astype(np.int64)


def _optional_prompts(arrays: dict[str, np.ndarray], n: int, path: Path) -> tuple[str, ...] | None:
    values = arrays.get("prompts")
    if values is None:
        return None
    if values.ndim != 1 or len(values) != n or values.dtype.kind != "U":
        raise DataError(
            f"{path}: 'prompts' must be {n} strings (one per image, numpy dtype 'U'), "
            f"found shape {values.shape} and dtype {values.dtype}"
        )
    return tuple(values.tolist())


def load_npz(
    path: str | os.PathLike[str],
    size: Size | None = None,
    value_range: tuple[float, float] | None = None,
    layout: Literal["auto", "NCHW", "NHWC"] = "auto",
) -> ImageDataset:
    """Load images from an ``.npz`` archive.

    The archive holds ``images`` shaped (N, C, H, W), (N, H, W, C) or (N, H, W) with C in
    {1, 3}, as uint8 or float16/32/64; optionally ``ids`` (unique ints; default 0..N-1),
    ``labels`` (ints), ``prompts`` (N unicode strings, e.g. ``np.array(list_of_str)``; object
    arrays are refused, as pickled data) and ``value_range`` (two floats). Values are rescaled
    linearly from the value range to [-1, 1].

    Args:
        path: The ``.npz`` file.
        size: Resize to this size (an int for a square, or ``(height, width)``) with antialiased
            bilinear interpolation.
        value_range: The ``(low, high)`` range the stored values use. None takes the archive's
            ``value_range``, else (0, 255) for uint8, else (-1, 1) for floats with negative
            values; float images within [0, 1] are ambiguous and need it.
        layout: ``"NCHW"`` or ``"NHWC"`` for 4-D images; ``"auto"`` infers it from which of
            axes 1 and 3 has 1 or 3 entries.

    Returns:
        The dataset, named after the file stem.

    Raises:
        DataError: If the file is missing or not an npz archive, has no ``images`` (the message
            lists the keys present), the shape, dtype, layout, ids, labels or prompts are
            invalid, the value range is ambiguous, or an image holds NaN/inf or values outside
            the range (the message names the first such image index).
    """
    path = Path(path).expanduser().resolve()
    target = parse_size(size)
    arrays = _read_arrays(path)
    if "images" not in arrays:
        raise DataError(f"{path} has no 'images' array; keys present: {sorted(arrays) or 'none'}")
    raw = arrays["images"]
    if raw.dtype != np.uint8 and raw.dtype.kind != "f":
        raise DataError(f"{path}: images must be uint8 or float, found dtype {raw.dtype}")
    nchw, used_layout = _to_nchw(raw, layout, path)
    if nchw.size == 0:
        raise DataError(f"{path}: images array is empty (shape {raw.shape})")
    if nchw.dtype.kind == "f":
        _check_finite(nchw, path)
    low, high = _value_range(nchw, value_range, arrays.get("value_range"), path)
    _check_range(nchw, low, high, path)
    scaled = (nchw.astype(np.float32) - np.float32(low)) * np.float32(2.0 / (high - low)) - 1.0
    # The values were checked; the clip only removes float32 rounding past the ends.
    images = torch.from_numpy(np.ascontiguousarray(np.clip(scaled, -1.0, 1.0), dtype=np.float32))
    n = len(images)
    ids = _optional_ints(arrays, "ids", n, path)
    return ImageDataset(
        images=resize_images(images, target),
        ids=np.arange(n, dtype=np.int64) if ids is None else ids,
        name=path.stem,
        labels=_optional_ints(arrays, "labels", n, path),
        prompts=_optional_prompts(arrays, n, path),
        source={
            "kind": "npz",
            "path": str(path),
            "size": size_record(target),
            "value_range": [low, high],
            "layout": used_layout,
            "sha256": sha256_file(path),
        },
    )
