from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from diffattr._seed import derive_seed
from diffattr.data._dataset import ImageDataset
from diffattr.errors import DataError

__all__ = ["DatasetSplit", "split_dataset"]


def _subsets(dataset: ImageDataset, in_query: np.ndarray) -> tuple[ImageDataset, ImageDataset]:
    """Return (train, query) for a boolean mask over the dataset's rows, keeping its order."""
    return dataset.select(dataset.ids[~in_query]), dataset.select(dataset.ids[in_query])


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """A disjoint train / query partition of one dataset.

    Attributes:
        train: The training images, in the original dataset's order.
        query: The held-out query images whose attributions are computed, in the same order.
        seed: The seed the query ids were drawn with.
    """

    train: ImageDataset
    query: ImageDataset
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable record from which :meth:`from_dict` rebuilds the split.

        Returns:
            ``{"seed", "query_ids": sorted ints, "n_train", "n_query"}``.
        """
        return {
            "seed": int(self.seed),
            "query_ids": sorted(int(i) for i in self.query.ids),
            "n_train": len(self.train),
            "n_query": len(self.query),
        }

    @classmethod
    def from_dict(cls, dataset: ImageDataset, record: dict[str, Any]) -> DatasetSplit:
        """Rebuild a split of the full ``dataset`` from a :meth:`to_dict` record.

        Args:
            dataset: The whole dataset the split was made from.
            record: The output of :meth:`to_dict`.

        Returns:
            The same split: query rows are the recorded ids, train rows are all the others.

        Raises:
            DataError: If the record is malformed, names ids missing from ``dataset``, or its
                sizes do not match ``dataset``.
        """
        missing_keys = [k for k in ("seed", "query_ids", "n_train", "n_query") if k not in record]
        if missing_keys:
            raise DataError(f"split record lacks {', '.join(missing_keys)}")
        try:
            query_ids = np.asarray(record["query_ids"], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise DataError(f"split record query_ids must be a list of ints: {err}") from err
        unknown = query_ids[~np.isin(query_ids, dataset.ids)]
        if len(unknown):
            raise DataError(
                f"split query id {unknown[0]} is not in dataset {dataset.name!r} "
                f"({len(unknown)} of {len(query_ids)} query ids missing)"
            )
        in_query = np.isin(dataset.ids, query_ids)
        n_query = int(in_query.sum())
        recorded = (record["n_train"], record["n_query"])
        if recorded != (len(dataset) - n_query, n_query) or n_query != len(query_ids):
            raise DataError(
                f"split record has n_train={recorded[0]}, n_query={recorded[1]} and "
                f"{len(query_ids)} query ids, but splitting dataset {dataset.name!r} of "
                f"{len(dataset)} images by them gives n_train={len(dataset) - n_query}, "
                f"n_query={n_query}; was the split made from a different dataset?"
            )
        train, query = _subsets(dataset, in_query)
        return cls(train=train, query=query, seed=int(record["seed"]))


def split_dataset(
    dataset: ImageDataset,
    n_query: int | None = None,
    query_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetSplit:
    """Split a dataset into train and query parts with a seeded, version-stable draw.

    Each sample id gets the key ``derive_seed(seed, "query-split", id)`` and the ``n_query``
    smallest keys form the query set. The draw depends only on the seed and the ids (not on
    numpy or torch random generators, nor on the dataset's order), so it is the same on every
    machine and library version, and a sample keeps its side when others are added or removed.

    Args:
        dataset: The dataset to split.
        n_query: Number of query images, 1..N-1. None uses ``round(query_fraction * N)``.
        query_fraction: Fraction of images to hold out when ``n_query`` is None, in (0, 1).
        seed: Root seed of the draw.

    Returns:
        The split; train and query keep the dataset's order and sample ids.

    Raises:
        DataError: If the query size is not in 1..N-1 or an argument has the wrong type.
    """
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise DataError(f"seed must be an int, got {seed!r}")
    n = len(dataset)
    if n_query is None:
        if not 0 < query_fraction < 1:
            raise DataError(f"query_fraction must be in (0, 1), got {query_fraction!r}")
        n_query = round(query_fraction * n)
    if not isinstance(n_query, Integral) or isinstance(n_query, bool) or not 0 < n_query < n:
        raise DataError(
            f"the query set must hold 1..{n - 1} of the {n} images, got n_query={n_query!r}"
        )
    keys = np.array([derive_seed(seed, "query-split", int(i)) for i in dataset.ids], dtype=np.int64)
    # Ties between 63-bit keys are all but impossible; breaking them by id keeps the order total.
    ranked = np.lexsort((dataset.ids, keys))
    in_query = np.zeros(n, dtype=bool)
    in_query[ranked[:n_query]] = True
    train, query = _subsets(dataset, in_query)
    return DatasetSplit(train=train, query=query, seed=int(seed))
