"""Featurisation spread over the processes of a ``torch.distributed`` job (e.g. under torchrun).

Each rank featurises a contiguous block of the samples into its own part store
``<path>/part-<rank>-of-<world>/`` (a store has one writer), and every rank then reads all the
parts as one :class:`ShardedStore`, which the methods accept wherever they accept a
:class:`FeatureStore`. The parts live on a file system all ranks share, as the stores of a
single process do. Reductions go through ``torch.distributed`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, StoreMismatchError
from diffattr.features._engine import FeatureConfig, featurize
from diffattr.features._store import FeatureStore


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed job (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Distributed:
        """The initialised default process group's rank and size, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    def block(self, n: int) -> slice:
        """This rank's contiguous block of ``n`` items (blocks differ in size by at most one)."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` over the ranks (float64; on the GPU when the backend is NCCL)."""
        if not self.active:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
        if dist.get_backend() == "nccl":
            tensor = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()


class _Concatenated:
    """Row-wise concatenation of per-part arrays, read lazily: slicing reads only what it needs."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self._parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self._starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, slice):
            return np.asarray(self)[index]
        start, stop, step = index.indices(len(self))
        if step != 1:
            return np.asarray(self)[index]
        pieces = []
        for part, first in zip(self._parts, self._starts[:-1], strict=True):
            lo, hi = max(start - first, 0), min(stop - first, len(part))
            if lo < hi:
                pieces.append(np.asarray(part[lo:hi]))
        if not pieces:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(p) for p in self._parts])
        return whole if dtype is None else whole.astype(dtype)


class ShardedStore:
    """The part stores of one featurisation, read as one store (rows in rank order).

    Attributes:
        parts: The part stores, rank 0 first.
        distributed: The job the parts were written by; :attr:`local_rows` are this rank's.
    """

    def __init__(self, parts: list[FeatureStore], distributed: Distributed) -> None:
        if not parts:
            raise StoreMismatchError("a sharded store needs at least one part")
        for part in parts[1:]:
            if (
                _shared(part.settings) != _shared(parts[0].settings)
                or part.arrays != parts[0].arrays
            ):
                raise StoreMismatchError(
                    f"{part.path} was made with other settings than {parts[0].path}"
                )
        self.parts = parts
        self.distributed = distributed
        sizes = np.cumsum([0] + [p.n for p in parts])
        self.local_rows = slice(int(sizes[distributed.rank]), int(sizes[distributed.rank + 1]))

    @property
    def path(self) -> Path:
        """The directory holding the parts."""
        return self.parts[0].path.parent

    @property
    def ids(self) -> np.ndarray:
        """All sample ids, in row order."""
        return np.concatenate([p.ids for p in self.parts])

    @property
    def n(self) -> int:
        """Number of samples over all parts."""
        return sum(p.n for p in self.parts)

    @property
    def settings(self) -> dict[str, Any]:
        """The run settings, shared by every part (each records its own rows' fingerprint)."""
        return _shared(self.parts[0].settings)

    def array(self, name: str) -> _Concatenated:
        """One array over all parts, read lazily."""
        return _Concatenated([p.array(name) for p in self.parts])

    def __repr__(self) -> str:
        return f"ShardedStore({str(self.path)!r}, parts={len(self.parts)}, n={self.n})"


def _shared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "dataset_fingerprint"}


def part_name(distributed: Distributed, rank: int | None = None) -> str:
    """Directory name of one rank's part store."""
    rank = distributed.rank if rank is None else rank
    return f"part-{rank:03d}-of-{distributed.world_size:03d}"


def featurize_sharded(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    dataset: ImageDataset,
    config: FeatureConfig,
    path: str | os.PathLike[str],
    *,
    model_id: str,
    distributed: Distributed | None = None,
    **options: Any,
) -> ShardedStore:
    """Featurise this rank's block of ``dataset`` into its part store, then open every part.

    Collective: every rank of the job must call it with the same arguments. Options are those
    of :func:`featurize` (batch size, chunk size, device...).

    Raises:
        ConfigError: Fewer samples than ranks.
    """
    distributed = distributed or Distributed.current()
    if len(dataset) < distributed.world_size:
        raise ConfigError(
            f"{len(dataset)} images cannot be split over {distributed.world_size} processes"
        )
    path = Path(path)
    own = dataset.select(dataset.ids[distributed.block(len(dataset))])
    featurize(
        model,
        scheduler_config,
        own,
        config,
        path / part_name(distributed),
        model_id=model_id,
        **options,
    )
    distributed.barrier()
    parts = [
        FeatureStore.open(path / part_name(distributed, rank))
        for rank in range(distributed.world_size)
    ]
    store = ShardedStore(parts, distributed)
    if not np.array_equal(store.ids, dataset.ids):
        raise StoreMismatchError(f"{path}: the parts do not hold the dataset's ids in order")
    return store
