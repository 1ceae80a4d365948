from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sklearn.datasets
import torch

from diffattr._io import sha256_file
from diffattr.data._dataset import ImageDataset
from diffattr.data._folder import METADATA_FILE, load_image_folder
from diffattr.data._npz import load_npz
from diffattr.data._resize import Size, is_positive_int, parse_size, resize_images
from diffattr.errors import DataError

__all__ = ["load_dataset", "load_digits", "load_from_source"]

_ACCEPTED_SPECS = "'digits', a folder of PNG/JPEG images, or an .npz file"


def _check_template(prompts: object) -> None:
    if prompts is not None and not isinstance(prompts, str):
        raise DataError(
            f"prompts must be a template string such as 'a handwritten {{label}}', got {prompts!r}"
        )


# Horizontal shear of the "slant" style: a row's ink moves by SLANT_SHEAR pixels per row above
# the centre (to the right at the top, to the left at the bottom), at the digits' 8x8 scale.
SLANT_SHEAR = 0.3
DIGIT_STYLES = ("slant",)


def _slant(ink: np.ndarray) -> np.ndarray:
    """Shear (N, H, W) ink in [0, 16] horizontally by linear interpolation; blank enters."""
    _, height, width = ink.shape
    columns = np.arange(width, dtype=np.float64)
    out = np.empty_like(ink)
    for row in range(height):
        shift = SLANT_SHEAR * ((height - 1) / 2 - row)
        # out[x] = in[x - shift]: sample every image's row at the shifted positions at once.
        source = columns - shift
        low = np.floor(source).astype(int)
        frac = (source - low).astype(ink.dtype)
        left = np.where((low >= 0) & (low < width), ink[:, row, np.clip(low, 0, width - 1)], 0)
        high = low + 1
        right = np.where((high >= 0) & (high < width), ink[:, row, np.clip(high, 0, width - 1)], 0)
        out[:, row] = (1 - frac) * left + frac * right
    return out


def load_digits(
    size: int | None = None, prompts: str | None = None, style: str | None = None
) -> ImageDataset:
    """Load scikit-learn's 1797 handwritten 8x8 digits (shipped with scikit-learn, no download).

    Pixel values 0..16 map linearly to [-1, 1]; sample ids are 0..1796 in scikit-learn's order
    and labels are the digit classes.

    Args:
        size: Resize to ``size x size`` with antialiased bilinear interpolation; None keeps 8x8.
        prompts: A prompt template such as ``"a handwritten {label}"`` (see
            :meth:`ImageDataset.with_prompts`); None gives no prompts.
        style: A fixed transform of every digit, applied at 8x8 before any resize: ``"slant"``
            shears each row horizontally by ``SLANT_SHEAR`` (0.3) pixels per row from the
            centre, linearly interpolated, so the digits lean right by about 17 degrees. None
            keeps them as they are. It is recorded in the source, so a dataset reloads styled.

    Returns:
        The ``"digits"`` dataset, shape (1797, 1, 8, 8) or (1797, 1, size, size).

    Raises:
        DataError: If ``size`` is not a positive int, ``prompts`` is not a valid template, or
            ``style`` is not one of ``DIGIT_STYLES``.
    """
    if size is not None and not is_positive_int(size):
        raise DataError(f"size must be a positive int, got {size!r}")
    if style is not None and style not in DIGIT_STYLES:
        raise DataError(f"unknown digits style {style!r}; expected one of {list(DIGIT_STYLES)}")
    _check_template(prompts)
    digits = sklearn.datasets.load_digits()
    ink = digits.images.astype(np.float32)
    if style == "slant":
        ink = _slant(ink)
    pixels = ink / 8.0 - 1.0
    images = torch.from_numpy(np.ascontiguousarray(pixels[:, None]))
    source: dict[str, Any] = {"kind": "digits", "size": None if size is None else int(size)}
    if style is not None:
        # Only when set, so the sources (and fingerprints) of unstyled digits stay as they were.
        source["style"] = style
    dataset = ImageDataset(
        images=resize_images(images, parse_size(size)),
        ids=np.arange(len(pixels), dtype=np.int64),
        name="digits" if style is None else f"digits-{style}",
        labels=digits.target.astype(np.int64),
        source=source,
    )
    return dataset if prompts is None else dataset.with_prompts(prompts)


def _with_template(dataset: ImageDataset, template: str | None) -> ImageDataset:
    """Apply a template to a folder or npz dataset, which must not have prompts of its own."""
    if template is None:
        return dataset
    if dataset.prompts is not None:
        raise DataError(f"{dataset.source['path']} has its own prompts; do not pass a template")
    return dataset.with_prompts(template)


def load_dataset(
    spec: str | os.PathLike[str],
    size: Size | None = None,
    value_range: tuple[float, float] | None = None,
    prompts: str | None = None,
    layout: Literal["auto", "NCHW", "NHWC"] = "auto",
) -> ImageDataset:
    """Load a dataset named on the command line or in a config.

    Args:
        spec: ``"digits"``, a folder of PNG/JPEG images, a samples folder (holding the
            ``samples.npz`` that ``diffattr sample`` writes), or a path ending in ``.npz``.
        size: Optional resize, passed to the matching loader.
        value_range: The pixel range of an ``.npz``'s float images (see :func:`load_npz`);
            an error for the other kinds, whose range is known.
        prompts: A prompt template such as ``"a handwritten {label}"`` (see
            :meth:`ImageDataset.with_prompts`). Folders (``metadata.jsonl``) and ``.npz`` files
            (a ``prompts`` array) may carry their own prompts instead; None keeps those.
        layout: The axis order of an ``.npz``'s 4-D images (see :func:`load_npz`); ignored for
            the other kinds, whose layout is known (so one setting can serve several specs).

    Returns:
        The loaded dataset.

    Raises:
        DataError: If ``spec`` is none of the accepted forms, the loader rejects the data, or
            ``prompts`` is given for files that have their own prompts or is not a valid template.
    """
    path = Path(spec).expanduser()
    if value_range is not None and path.suffix.lower() != ".npz":
        raise DataError(f"value_range applies to .npz files only, not to {os.fspath(spec)!r}")
    _check_template(prompts)
    if isinstance(spec, str) and spec == "digits":
        target = parse_size(size)
        if target is not None and target[0] != target[1]:
            raise DataError(f"digits images are square; got size={size!r}")
        return load_digits(None if target is None else target[0], prompts)
    if path.is_dir() and (path / "samples.npz").is_file():
        # A folder written by `diffattr sample`: its images are in samples.npz, with their seeds.
        return _with_template(load_npz(path / "samples.npz", size), prompts)
    if path.is_dir():
        return _with_template(load_image_folder(path, size), prompts)
    if path.suffix.lower() == ".npz":
        return _with_template(load_npz(path, size, value_range, layout), prompts)
    raise DataError(f"cannot load dataset {os.fspath(spec)!r}: expected {_ACCEPTED_SPECS}")


def _require(source: dict[str, Any], *keys: str) -> None:
    missing = [key for key in keys if key not in source]
    if missing:
        raise DataError(f"dataset source of kind {source['kind']!r} lacks {', '.join(missing)}")


def _reload(source: dict[str, Any]) -> ImageDataset:
    kind = source["kind"]
    if kind == "digits":
        _require(source, "size")
        return load_digits(source["size"], style=source.get("style"))
    if kind == "folder":
        _require(source, "path", "size", "channels", "files")
        dataset = load_image_folder(source["path"], source["size"], source["channels"])
        if dataset.source["files"] != source["files"]:
            raise DataError(f"the image files in {source['path']} changed since it was loaded")
        if dataset.source.get("metadata_sha256") != source.get("metadata_sha256"):
            raise DataError(f"{METADATA_FILE} in {source['path']} changed since it was loaded")
        return dataset
    if kind == "npz":
        _require(source, "path", "size", "value_range", "layout", "sha256")
        if Path(source["path"]).is_file() and sha256_file(source["path"]) != source["sha256"]:
            raise DataError(f"{source['path']} changed since it was loaded (SHA-256 differs)")
        return load_npz(source["path"], source["size"], source["value_range"], source["layout"])
    if kind == "memory":
        raise DataError("a dataset built in memory (source kind 'memory') cannot be reloaded")
    raise DataError(f"unknown dataset source kind {kind!r}; expected digits, folder or npz")


def _prompt_template(source: dict[str, Any]) -> str | None:
    """Return the prompt template the source records; None if it records no prompts."""
    record = source.get("prompts")
    if record is None:
        return None
    if isinstance(record, dict) and "list_sha256" in record:
        raise DataError(
            "prompts given in memory cannot be reloaded; use a template, or store them with the "
            f"images (in {METADATA_FILE} or the .npz's 'prompts' array)"
        )
    if not isinstance(record, dict) or not isinstance(record.get("template"), str):
        raise DataError(f"dataset source has malformed prompts {record!r}; expected a template")
    return record["template"]


def load_from_source(source: dict[str, Any]) -> ImageDataset:
    """Reload a dataset exactly from its ``ImageDataset.source`` description.

    Subsets made with :meth:`ImageDataset.select` record their sample ids, so they reload as the
    same subset; a recorded prompt template is re-applied. Folder and npz sources are checked
    against the recorded file names or file hashes.

    Args:
        source: The ``source`` dict of a dataset, e.g. read back from run metadata.

    Returns:
        A dataset with the same images, ids, labels and prompts as the one the source came from.

    Raises:
        DataError: If the source is malformed or of an unknown kind, records prompts that were
            given in memory, the data changed on disk, or the loader rejects the data.
    """
    if not isinstance(source, dict) or "kind" not in source:
        raise DataError(f"a dataset source must be a dict with a 'kind' key, got {source!r}")
    template = _prompt_template(source)  # before reloading, so unreloadable prompts fail fast
    dataset = _reload(source)
    if template is not None:
        # On the whole dataset: a template sees only each row's id and label, so selecting
        # afterwards gives the subset the prompts it had.
        dataset = dataset.with_prompts(template)
    return dataset if source.get("ids") is None else dataset.select(source["ids"])
