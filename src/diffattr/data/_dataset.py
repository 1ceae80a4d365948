from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffattr.errors import DataError

__all__ = ["ImageDataset"]


def _as_int_vector(values: object, what: str, n: int) -> np.ndarray:
    """Return ``values`` as a read-only 1-D int64 copy of length ``n``; DataError otherwise."""
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise DataError(f"{what} must have shape ({n},), found shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise DataError(f"{what} must be integers, found dtype {array.dtype}")
    array = array.astype(np.int64)  # always a copy, so callers cannot mutate it behind our back
    array.flags.writeable = False
    return array


def _check_images(images: object, name: str) -> torch.Tensor:
    """Return ``images`` if it is a non-empty finite (N, C, H, W) float32 CPU tensor in [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        found = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise DataError(f"images must be an (N, C, H, W) torch.Tensor, found {found}")
    if images.dtype != torch.float32:
        raise DataError(f"images must be float32, found {images.dtype}")
    if images.device.type != "cpu":
        raise DataError(f"images must be on the CPU, found device {images.device}")
    n, channels = images.shape[:2]
    if n == 0:
        raise DataError(f"dataset {name!r} has no images")
    if channels not in (1, 3):
        raise DataError(f"images must have 1 or 3 channels, found {channels}")
    flat = images.detach().reshape(n, -1)
    non_finite = ~torch.isfinite(flat).all(dim=1)
    if non_finite.any():
        index = int(non_finite.nonzero()[0])
        raise DataError(f"image {index} of dataset {name!r} has NaN or infinite values")
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    outside = (low < -1) | (high > 1)
    if outside.any():
        index = int(outside.nonzero()[0])
        raise DataError(
            f"image {index} of dataset {name!r} has values in "
            f"[{float(low[index]):g}, {float(high[index]):g}], outside [-1, 1]"
        )
    return images


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A set of images with stable sample ids, ready for training and attribution.

    Datasets compare by identity; compare :meth:`fingerprint` values to compare their content.

    Attributes:
        images: ``(N, C, H, W)`` float32 CPU tensor with values in ``[-1, 1]``.
        ids: ``(N,)`` int64 sample ids, unique and stable across reloads and subsets.
        name: Short name, e.g. ``"digits"`` or the folder / ``.npz`` file name.
        labels: Optional ``(N,)`` int64 class labels.
        source: JSON-serialisable description that :func:`load_from_source` reloads exactly.
    """

    images: torch.Tensor
    ids: np.ndarray
    name: str
    labels: np.ndarray | None = None
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "memory"})

    def __post_init__(self) -> None:
        images = _check_images(self.images, self.name)
        n = images.shape[0]
        ids = _as_int_vector(self.ids, "ids", n)
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != n:
            raise DataError(f"ids must be unique; sample id {unique[counts > 1][0]} repeats")
        labels = None if self.labels is None else _as_int_vector(self.labels, "labels", n)
        try:
            # A JSON round trip both checks the source and detaches it from the caller's dict.
            source = json.loads(json.dumps(self.source))
        except (TypeError, ValueError) as err:
            raise DataError(f"source must be JSON-serialisable: {err}") from err
        # Frozen dataclass: normalise the fields in place of the caller's objects.
        object.__setattr__(self, "images", images.contiguous())
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "source", source)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"
        )

    @property
    def channels(self) -> int:
        """Number of colour channels, 1 or 3."""
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """Image ``(height, width)`` in pixels."""
        return self.images.shape[2], self.images.shape[3]

    def select(self, ids: Sequence[int] | np.ndarray) -> ImageDataset:
        """Return the rows with the given sample ids, in the order given.

        The subset keeps the sample ids, and its ``source`` records them so that
        :func:`load_from_source` reloads the subset rather than the whole dataset.

        Args:
            ids: Sample ids (not positions) to keep; no repeats.

        Returns:
            A new dataset holding those rows.

        Raises:
            DataError: If ``ids`` is empty, not integers, repeats an id, or names an id that is not
                in this dataset (the message names the first such id).
        """
        wanted = np.asarray(ids)
        if wanted.size == 0:
            raise DataError("select() needs at least one sample id")
        if wanted.ndim != 1 or wanted.dtype.kind not in "iu":
            raise DataError(f"select() needs a 1-D sequence of integer ids, found {wanted.dtype}")
        wanted = wanted.astype(np.int64)
        unique, counts = np.unique(wanted, return_counts=True)
        if len(unique) != len(wanted):
            raise DataError(f"select() got sample id {unique[counts > 1][0]} more than once")
        order = np.argsort(self.ids)
        sorted_ids = self.ids[order]
        slots = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
        missing = sorted_ids[slots] != wanted
        if missing.any():
            raise DataError(f"sample id {wanted[missing][0]} is not in dataset {self.name!r}")
        positions = order[slots]
        return ImageDataset(
            images=self.images[torch.from_numpy(positions)].contiguous(),
            ids=wanted,
            name=self.name,
            labels=None if self.labels is None else self.labels[positions],
            source={**self.source, "ids": wanted.tolist()},
        )

    def fingerprint(self) -> str:
        """Return a SHA-256 hex digest of the ids, images and labels.

        Identical content gives an identical fingerprint whatever the name or source, so a run can
        check that it sees the same data as the run it resumes or evaluates.

        Returns:
            64 hexadecimal characters.
        """
        digest = hashlib.sha256()
        digest.update(np.asarray(self.images.shape, dtype="<i8").tobytes())
        digest.update(self.ids.astype("<i8").tobytes())
        digest.update(self.images.detach().numpy().astype("<f4", copy=False).tobytes())
        if self.labels is None:
            digest.update(b"no-labels")
        else:
            digest.update(b"labels")
            digest.update(self.labels.astype("<i8").tobytes())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary for run metadata.

        Returns:
            ``{"name", "n", "shape": [C, H, W], "fingerprint", "source"}``.
        """
        return {
            "name": self.name,
            "n": len(self),
            "shape": list(self.images.shape[1:]),
            "fingerprint": self.fingerprint(),
            "source": copy.deepcopy(self.source),
        }
