from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from diffattr.data._dataset import ImageDataset
from diffattr.data._resize import Size, parse_size, size_record
from diffattr.errors import DataError

__all__ = ["load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.jsonl"  # the Hugging Face imagefolder name for per-image captions
_GRAY_8BIT_MODES = ("1", "L", "LA", "La")
_GRAY_16BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L"


def _to_gray_or_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """Convert to "L" or "RGB" (alpha dropped) and say whether the image is grayscale."""
    if image.mode in _GRAY_8BIT_MODES:
        return image.convert("L"), True
    rgb = image.convert("RGB")
    if image.mode in ("P", "PA"):
        # A palette image is grayscale when every colour it uses is a gray.
        pixels = np.asarray(rgb)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
            return rgb.getchannel("R"), True
    return rgb, False


def _decode(
    image: Image.Image, path: Path, size: tuple[int, int] | None
) -> tuple[np.ndarray, bool]:
    """Return an ``(H, W, C)`` float32 array in [0, 1] (C is 1 or 3) and whether it is grayscale."""
    pillow_size = None if size is None else (size[1], size[0])  # Pillow sizes are (width, height)
    if image.mode in _GRAY_16BIT_MODES:
        pixels = np.asarray(image).astype(np.float32)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DataError(f"{path}: 32-bit image with values outside the 16-bit range 0..65535")
        pixels /= 65535.0
        if pillow_size is not None:
            # Resample in float mode so 16-bit images keep their precision.
            resized = Image.fromarray(pixels).resize(pillow_size, Image.Resampling.BICUBIC)
            pixels = np.clip(np.asarray(resized), 0.0, 1.0)
        return pixels[..., None], True
    converted, gray = _to_gray_or_rgb(image)
    if pillow_size is not None:
        converted = converted.resize(pillow_size, Image.Resampling.BICUBIC)
    pixels = np.asarray(converted, dtype=np.float32) / 255.0
    return (pixels[..., None] if gray else pixels), gray


def _read(path: Path, size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    try:
        with Image.open(path) as image:
            image.load()
            return _decode(image, path, size)
    # Pillow raises SyntaxError for some malformed files, and DecompressionBombError (no
    # OSError) for images too large to decode safely.
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def _image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory")
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )
    if not files:
        raise DataError(f"no PNG/JPEG images in {folder}")
    return files


def _read_prompts(path: Path, names: list[str]) -> tuple[tuple[str, ...], str]:
    """Return the ``text`` of each image in ``names`` order, and the file's SHA-256.

    Every line is a JSON object with ``file_name`` and ``text``; blank lines are skipped and
    other keys ignored. Each image needs exactly one line, and each line must name an image.
    """
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from err
    is_image = set(names)
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON: {err}") from err
        if not isinstance(record, dict) or not {"file_name", "text"} <= record.keys():
            raise DataError(f"{path} line {number}: expected an object with file_name and text")
        name, text = record["file_name"], record["text"]
        if not isinstance(text, str):
            raise DataError(
                f"{path} line {number}: text must be a string, found {type(text).__name__}"
            )
        if not isinstance(name, str) or name not in is_image:
            raise DataError(
                f"{path} line {number}: file_name {name!r} is not an image in {path.parent}"
            )
        if name in texts:
            raise DataError(
                f"{path} line {number}: {name!r} is listed again (first on line {first_line[name]})"
            )
        texts[name], first_line[name] = text, number
    for name in names:
        if name not in texts:
            raise DataError(f"{path} has no line for image {name!r}")
    return tuple(texts[name] for name in names), hashlib.sha256(data).hexdigest()


def load_image_folder(
    path: str | os.PathLike[str],
    size: Size | None = None,
    channels: Literal["auto", 1, 3] = "auto",
) -> ImageDataset:
    """Load every PNG/JPEG image in a folder (not its subfolders), sorted by file name.

    Sample ids are 0..N-1 in file-name order and the file names are kept in ``source["files"]``.
    Alpha channels are dropped; 16-bit grayscale PNGs are scaled by 1/65535. If the folder holds a
    ``metadata.jsonl`` (the Hugging Face imagefolder convention: one ``{"file_name": ...,
    "text": ...}`` object per line, one line per image), its texts become the prompts and
    ``source["metadata_sha256"]`` records the file's hash.

    Args:
        path: The folder. Files other than ``.png``, ``.jpg`` and ``.jpeg`` (any case) are
            ignored.
        size: Resize every image to this size (an int for a square, or ``(height, width)``) with
            Pillow's bicubic filter. Required when the images differ in size.
        channels: 1 or 3 to force grayscale or RGB; ``"auto"`` gives 1 if every image is
            grayscale and 3 otherwise (grayscale images are then replicated to RGB).

    Returns:
        The dataset, named after the folder, without labels.

    Raises:
        DataError: If the folder is missing or holds no images, an image cannot be read (the
            message names the file), the images differ in size and ``size`` is None, an
            argument is invalid, or ``metadata.jsonl`` is malformed, names a file that is not an
            image of the folder, repeats one, or misses one (the message names the line).
    """
    folder = Path(path).expanduser().resolve()
    target = parse_size(size)
    if channels not in ("auto", 1, 3):
        raise DataError(f"channels must be 'auto', 1 or 3, got {channels!r}")
    files = _image_files(folder)
    names = [file.name for file in files]
    metadata = folder / METADATA_FILE
    prompts, metadata_sha256 = None, None
    if metadata.is_file():
        # Read before decoding the images, so a bad metadata file fails fast.
        prompts, metadata_sha256 = _read_prompts(metadata, names)
    decoded = [_read(file, target) for file in files]
    if target is None:
        first_shape = decoded[0][0].shape[:2]
        for file, (pixels, _) in zip(files, decoded, strict=True):
            if pixels.shape[:2] != first_shape:
                raise DataError(
                    "images have different sizes (height x width): "
                    f"{files[0].name} is {first_shape[0]}x{first_shape[1]}, "
                    f"{file.name} is {pixels.shape[0]}x{pixels.shape[1]}; "
                    f"pass size=... to resize them in {folder}"
                )
    n_channels = channels if channels != "auto" else 1 if all(g for _, g in decoded) else 3
    arrays = []
    for pixels, gray in decoded:
        if n_channels == 3 and gray:
            pixels = np.repeat(pixels, 3, axis=2)
        elif n_channels == 1 and not gray:
            pixels = pixels @ _LUMA[:, None]
        arrays.append(pixels)
    stacked = np.stack(arrays).transpose(0, 3, 1, 2) * 2.0 - 1.0
    # Clip only float rounding (e.g. luma weights summing to 1 + 1e-7); values are already in range.
    images = torch.from_numpy(np.ascontiguousarray(np.clip(stacked, -1.0, 1.0), dtype=np.float32))
    source: dict[str, Any] = {
        "kind": "folder",
        "path": str(folder),
        "size": size_record(target),
        "channels": n_channels,
        "files": names,
    }
    if metadata_sha256 is not None:
        # Only then, so sources of folders without metadata stay as they always were.
        source["metadata_sha256"] = metadata_sha256
    return ImageDataset(
        images=images,
        ids=np.arange(len(files), dtype=np.int64),
        name=folder.name,
        prompts=prompts,
        source=source,
    )
