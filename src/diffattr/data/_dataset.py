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


def _as_prompts(values: object, n: int) -> tuple[str, ...]:
    """Return ``values`` as a tuple of ``n`` Python strings; DataError otherwise."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind != "U":
            raise DataError(
                "prompts must be a 1-D array of strings, "
                f"found shape {values.shape} and dtype {values.dtype}"
            )
        values = values.tolist()
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise DataError(f"prompts must be a sequence of strings, found {type(values).__name__}")
    if len(values) != n:
        raise DataError(
            f"prompts must have one string per image: {len(values)} prompts for {n} images"
        )
    for index, prompt in enumerate(values):
        if not isinstance(prompt, str):
            raise DataError(f"prompt {index} must be a str, found {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")  # the fingerprint hashes UTF-8; lone surrogates have none
        except UnicodeEncodeError as err:
            raise DataError(f"prompt {index} is not valid Unicode text: {err}") from err
    return tuple(str(prompt) for prompt in values)  # str() turns numpy strings into plain ones


def _format_prompts(
    template: str, ids: np.ndarray, labels: np.ndarray | None, name: str
) -> tuple[str, ...]:
    """Return ``template.format(label=..., id=...)`` for every row."""
    if labels is None:
        fields = [{"id": int(i)} for i in ids]
    else:
        fields = [{"id": int(i), "label": int(label)} for i, label in zip(ids, labels, strict=True)]
    try:
        return tuple(template.format(**row) for row in fields)
    except KeyError as err:
        if err.args[0] == "label":
            raise DataError(
                f"prompt template {template!r} uses {{label}} but dataset {name!r} has no labels"
            ) from err
        raise DataError(
            f"prompt template {template!r} uses unknown field {{{err.args[0]}}}; "
            "only {label} and {id} are available"
        ) from err
    except (AttributeError, IndexError, TypeError, ValueError) as err:
        raise DataError(f"invalid prompt template {template!r}: {err}") from err


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
        prompts: Optional text prompt per image, for text-conditioned models.
        source: JSON-serialisable description that :func:`load_from_source` reloads exactly.
    """

    images: torch.Tensor
    ids: np.ndarray
    name: str
    labels: np.ndarray | None = None
    prompts: tuple[str, ...] | None = None
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "memory"})

    def __post_init__(self) -> None:
        images = _check_images(self.images, self.name)
        n = images.shape[0]
        ids = _as_int_vector(self.ids, "ids", n)
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != n:
            raise DataError(f"ids must be unique; sample id {unique[counts > 1][0]} repeats")
        labels = None if self.labels is None else _as_int_vector(self.labels, "labels", n)
        prompts = None if self.prompts is None else _as_prompts(self.prompts, n)
        try:
            # A JSON round trip both checks the source and detaches it from the caller's dict.
            source = json.loads(json.dumps(self.source))
        except (TypeError, ValueError) as err:
            raise DataError(f"source must be JSON-serialisable: {err}") from err
        # Frozen dataclass: normalise the fields in place of the caller's objects.
        object.__setattr__(self, "images", images.contiguous())
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "prompts", prompts)
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
            prompts=None if self.prompts is None else tuple(self.prompts[i] for i in positions),
            source={**self.source, "ids": wanted.tolist()},
        )

    def with_prompts(self, template_or_prompts: str | Sequence[str] | np.ndarray) -> ImageDataset:
        """Return a copy of this dataset with one text prompt per image, replacing any it has.

        A template is recorded in ``source``, so :func:`load_from_source` re-applies it. Explicit
        prompts are only recorded by their hash: a dataset given them here cannot be reloaded.

        Args:
            template_or_prompts: A template formatted per image with ``template.format(label=...,
                id=...)`` (the image's class label and sample id), e.g. ``"a handwritten
                {label}"``; or the prompts themselves, one string per image in row order.

        Returns:
            A new dataset with the same images, ids and labels.

        Raises:
            DataError: If the template uses ``{label}`` on a dataset without labels, uses another
                field than ``{label}`` and ``{id}``, or is malformed; or if the prompts are not
                one string per image.
        """
        if isinstance(template_or_prompts, str):
            prompts = _format_prompts(template_or_prompts, self.ids, self.labels, self.name)
            record: dict[str, str] = {"template": template_or_prompts}
        else:
            prompts = _as_prompts(template_or_prompts, len(self))
            listed = json.dumps(list(prompts)).encode("utf-8")
            record = {"list_sha256": hashlib.sha256(listed).hexdigest()}
        return ImageDataset(
            images=self.images,
            ids=self.ids,
            name=self.name,
            labels=self.labels,
            prompts=prompts,
            source={**self.source, "prompts": record},
        )

    def fingerprint(self) -> str:
        """Return a SHA-256 hex digest of the ids, images, labels and prompts.

        Identical content gives an identical fingerprint whatever the name or source, so a run can
        check that it sees the same data as the run it resumes or evaluates. A dataset without
        prompts has the digest it had before prompts existed, so recorded fingerprints still match.

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
        if self.prompts is not None:
            digest.update(b"prompts")
            for prompt in self.prompts:
                # Length-prefixed, so ["ab", "c"] and ["a", "bc"] differ.
                encoded = prompt.encode("utf-8")
                digest.update(len(encoded).to_bytes(8, "little"))
                digest.update(encoded)
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
