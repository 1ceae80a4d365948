"""Gradient features preconditioned by a curvature estimate: the two routes of curvature influence.

With the estimate's eigenbasis Q = Q_S (x) Q_A per layer (the rest: its diagonal) and eigenvalues
Lambda (K-FAC's s_j a_m or EK-FAC's corrected ones),

    phi(z) = c (Lambda + lambda)^-1/2 Q^T g(z),
    phi(x) . phi(z) = c^2 g(x)^T (G + lambda I)^-1 g(z),

g the plan-averaged gradient of the features' output function (unnormalised: the curvature is in
the loss's units). The factored backend computes Q^T g from its hooks with P_out = Q_S and
P_in = Q_A (:class:`~._curvature.CurvatureProjector`), never forming g.

- **exact** route: every eigenvector (k = p), nothing truncated. Such features are too large to
  store for a training set, so :class:`StreamedFeatures` computes them when they are read, a block
  of training images at a time, and keeps none.
- **projected** route: the top k_out eigenvectors of S and k_in of A per layer, sized by the
  Kronecker layout's budget rule; stored like any features (:func:`featurize_preconditioned`).
  Their inner products give the influence truncated to the kept eigen-directions (LoGra-style:
  a data-dependent Kronecker projection instead of a random one).

c is 1 for influence, and sqrt(2 / (N D)) for DAS, whose kernel sum_i J_i^T J_i is in units of
the sum over the N training images of J^T J, that is N D / 2 times the mean Gauss-Newton matrix
(docs/methods.md, "K-FAC / EK-FAC influence").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.features._curvature import (
    Curvature,
    CurvatureConfig,
    CurvatureProjector,
    Kind,
    compute_dtype,
    estimate_curvature,
    full_projection,
)
from diffattr.features._distributed import Distributed, ShardedStore, part_name
from diffattr.features._engine import _DTYPES, FeatureConfig, _batch_gradients
from diffattr.features._factored import FactoredGradientComputer
from diffattr.features._plan import Plan
from diffattr.features._store import FeatureStore

__all__ = [
    "PreconditionedFeaturizer",
    "StreamedFeatures",
    "curvature_features",
    "featurize_preconditioned",
    "preconditioned_computer",
    "stage_directory",
]


def curvature_features(base: FeatureConfig) -> FeatureConfig:
    """``base`` as curvature methods featurise: factored, unnormalised, eigenvector blocks to k.

    The projection's ``factored_dim`` defaults to k (one stage: the kept eigen-directions are the
    features); a larger one keeps more of them and maps them to k by the sparse final stage.
    """
    projection = replace(
        base.projection,
        kind="kronecker",
        factored_dim=base.projection.factored_dim or base.projection.dim,
    )
    return replace(base, projection=projection, backend="factored", normalize=False)


def preconditioned_computer(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    features: FeatureConfig,
    curvature: Curvature,
    *,
    kind: Kind,
    damping: float,
    scale: float = 1.0,
    exact: bool = False,
    device: str | torch.device = "cpu",
) -> FactoredGradientComputer:
    """The factored backend with the curvature's eigenvectors as its factors, preconditioned.

    Args:
        model: The model the curvature was estimated for.
        scheduler_config: Its noise schedule.
        features: Output function, projection budget (ignored when ``exact``), parameters, dtype.
        curvature: The estimate.
        kind: ``"kfac"`` or ``"ekfac"`` eigenvalues.
        damping: lambda as a multiple of the mean eigenvalue.
        scale: c, a factor on every feature.
        exact: Keep every eigenvector (k = p) instead of the layout's budget.
        device: Where to compute.

    Returns:
        A computer whose ``compute_features`` gives phi(z) per plan step (before averaging).
    """
    projection = (
        full_projection(model, features.parameters, features.projection.seed)
        if exact
        else features.projection
    )
    computer = FactoredGradientComputer(
        model,
        scheduler_config,
        features.output,
        projection,
        features.parameters,
        dtype=compute_dtype(features),
        device=device,
    )
    computer.projector = CurvatureProjector(
        computer.layout, curvature, kind=kind, damping=damping, scale=scale, device=device
    )
    return computer


def _settings(
    computer: FactoredGradientComputer,
    scheduler_config: dict[str, Any],
    features: FeatureConfig,
    model_id: str,
    dataset: ImageDataset,
) -> dict[str, Any]:
    settings = {
        "model_id": model_id,
        "scheduler": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        "features": features.identity(),
        "projector": computer.projector.to_dict(),
        "parameter_count": computer.num_parameters,
        "dataset_fingerprint": dataset.fingerprint(),
    }
    return json.loads(json.dumps(settings))


def _rows(
    computer: FactoredGradientComputer,
    plan: Plan,
    dataset: ImageDataset,
    ids: np.ndarray,
    features: FeatureConfig,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Every array of a store for the images ``ids`` (in that order), computed batch by batch."""
    row_of = {int(i): row for row, i in enumerate(dataset.ids)}
    parts: dict[str, list[np.ndarray]] = {
        "features": [],
        "losses": [],
        "grad_norms": [],
        "residuals": [],
    }
    for start in range(0, len(ids), batch_size):
        batch_ids = ids[start : start + batch_size]
        rows = torch.as_tensor([row_of[int(i)] for i in batch_ids])
        prompts = None if dataset.prompts is None else [dataset.prompts[r] for r in rows]
        mean, aux = _batch_gradients(
            computer,
            plan,
            dataset.images[rows],
            prompts,
            batch_ids,
            features.normalize,
            _DTYPES[features.dtype],
        )
        parts["features"].append(mean.detach().cpu().numpy())
        for name, value in aux.items():
            parts[name].append(value.astype(features.dtype))
    return {name: np.concatenate(values) for name, values in parts.items()}


def featurize_preconditioned(
    computer: FactoredGradientComputer,
    scheduler_config: dict[str, Any],
    dataset: ImageDataset,
    features: FeatureConfig,
    path: str | Path,
    *,
    model_id: str,
    batch_size: int = 32,
    chunk_size: int = 256,
    progress: bool = True,
) -> FeatureStore:
    """Store (or resume storing) the preconditioned features of ``dataset``: the projected route.

    Args:
        computer: From :func:`preconditioned_computer`.
        scheduler_config: The model's noise schedule (recorded).
        dataset: The images.
        features: The settings ``computer`` was made with.
        path: The store directory (resumed with the same settings, refused with others).
        model_id: Identifies the weights.
        batch_size: Images per gradient batch.
        chunk_size: Images per store chunk.
        progress: Show a progress bar.

    Returns:
        A complete store with the engine's arrays; its settings record the curvature and the
        preconditioning.
    """
    plan = Plan.build(features.plan, computer.num_train_timesteps)
    r, steps = computer.num_outputs, len(plan)
    store = FeatureStore.create_or_resume(
        path,
        settings=_settings(computer, scheduler_config, features, model_id, dataset),
        ids=dataset.ids,
        arrays={
            "features": ((r, computer.proj_dim), features.dtype),
            "losses": ((steps,), features.dtype),
            "grad_norms": ((steps,), features.dtype),
            "residuals": ((steps, r), features.dtype),
        },
        chunk_size=chunk_size,
    )
    pending = store.pending_chunks()
    bar = tqdm(
        total=sum(len(store.chunk_ids(c)) for c in pending),
        desc="preconditioned features",
        unit="image",
        disable=not progress,
    )
    for chunk in pending:
        ids = store.chunk_ids(chunk)
        store.write_chunk(chunk, _rows(computer, plan, dataset, ids, features, batch_size))
        bar.update(len(ids))
    bar.close()
    store.finalize()
    return store


class StreamedFeatures:
    """Preconditioned features computed when read and never stored: the exact route.

    Reads like a :class:`~diffattr.features.FeatureStore` (``ids``, ``n``, ``settings``,
    ``array(name)[start:stop]``), but each slice runs the model on those images: a full-size
    feature has p values, too many to keep for a training set. The last slice read is kept, so
    reading several arrays of the same rows computes them once.

    Args:
        computer: From :func:`preconditioned_computer` with ``exact=True``.
        scheduler_config: The model's noise schedule (recorded in the settings).
        dataset: The images, in row order.
        features: The settings ``computer`` was made with.
        model_id: Identifies the weights.
        batch_size: Images per gradient batch, and the rows a scorer should read at a time.
        path: Shown in messages (nothing is written there).
    """

    def __init__(
        self,
        computer: FactoredGradientComputer,
        scheduler_config: dict[str, Any],
        dataset: ImageDataset,
        features: FeatureConfig,
        *,
        model_id: str,
        batch_size: int = 32,
        path: str | Path = "(streamed)",
    ) -> None:
        self._computer = computer
        self._dataset = dataset
        self._features = features
        self._plan = Plan.build(features.plan, computer.num_train_timesteps)
        self.settings = _settings(computer, scheduler_config, features, model_id, dataset)
        self.batch_size = batch_size
        self.path = Path(path)
        self._last: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    @property
    def ids(self) -> np.ndarray:
        """The sample ids, in row order."""
        return self._dataset.ids

    @property
    def n(self) -> int:
        """The number of samples."""
        return len(self._dataset)

    def array(self, name: str) -> _StreamedArray:
        """Array ``name`` (features, losses, grad_norms or residuals), computed when sliced."""
        if name not in ("features", "losses", "grad_norms", "residuals"):
            raise KeyError(f"no array {name!r} in streamed features")
        return _StreamedArray(self, name)

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Every array for rows ``start:stop``."""
        if self._last is None or self._last[0] != (start, stop):
            ids = self._dataset.ids[start:stop]
            values = _rows(
                self._computer, self._plan, self._dataset, ids, self._features, self.batch_size
            )
            self._last = ((start, stop), values)
        return self._last[1]

    def __repr__(self) -> str:
        return f"StreamedFeatures({str(self.path)!r}, n={self.n})"


class _StreamedArray:
    """One array of :class:`StreamedFeatures`; only contiguous slices are supported."""

    def __init__(self, source: StreamedFeatures, name: str) -> None:
        self._source = source
        self._name = name
        r = source._computer.num_outputs
        steps = len(source._plan)
        shapes = {
            "features": (r, source._computer.proj_dim),
            "losses": (steps,),
            "grad_norms": (steps,),
            "residuals": (steps, r),
        }
        self.shape = (source.n, *shapes[name])
        self.dtype = np.dtype(source._features.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("streamed features are read by contiguous slices of rows")
        start, stop, _ = index.indices(len(self))
        return self._source.rows(start, stop)[self._name]


class PreconditionedFeaturizer:
    """The curvature stage on the training images, then features preconditioned by it.

    What curvature methods return from
    :meth:`~diffattr.methods.AttributionMethod.featurizer`: constructing it estimates (or loads)
    the curvature under ``out_dir/curvature/``; calling it featurises a dataset. Stores go under
    ``out_dir/features/<weights>/<kind>-<settings>/``; the exact route's training features are
    streamed.

    Args:
        model: The checkpoint's model.
        scheduler_config: Its noise schedule.
        train: The training images (the curvature's, and the ones scored).
        features: From :func:`curvature_features`.
        estimate: How the curvature is estimated.
        out_dir: The run directory.
        kind: ``"kfac"`` or ``"ekfac"``.
        damping: lambda as a multiple of the mean eigenvalue.
        exact: The exact route (streamed, every eigenvector) instead of the projected one.
        kernel_units: Scale features by sqrt(2 / (N D)), DAS's units (see the module docstring).
        model_id: Identifies the weights.
        batch_size: Images per batch.
        chunk_size: Images per store chunk and per saved partial sum of the curvature.
        device: Where to compute.
        progress: Show progress bars.
        distributed: The job; its ranks estimate the curvature together and each featurise
            their block of the training images.

    Raises:
        ConfigError: The exact route in a distributed job (each rank would stream every
            training image): use the projected route there.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        train: ImageDataset,
        features: FeatureConfig,
        estimate: CurvatureConfig,
        out_dir: str | Path,
        *,
        kind: Kind,
        damping: float,
        exact: bool,
        kernel_units: bool,
        model_id: str,
        batch_size: int = 32,
        chunk_size: int = 256,
        device: str | torch.device = "cpu",
        progress: bool = True,
        distributed: Distributed | None = None,
    ) -> None:
        self.distributed = distributed or Distributed.current()
        if exact and self.distributed.active:
            raise ConfigError(
                "the exact route streams every training image for each query block; under "
                "torchrun use route='projected'"
            )
        out_dir = Path(out_dir)
        options = {"batch_size": batch_size, "device": device, "progress": progress}
        self.curvature = estimate_curvature(
            model,
            scheduler_config,
            train,
            features,
            estimate,
            stage_directory(out_dir, features, estimate, train, model_id),
            model_id=model_id,
            chunk_size=chunk_size,
            distributed=self.distributed,
            **options,
        )
        scale = (
            math.sqrt(2 / (self.curvature.n_images * self.curvature.output_size))
            if kernel_units
            else 1.0
        )
        self.computer = preconditioned_computer(
            model,
            scheduler_config,
            features,
            self.curvature,
            kind=kind,
            damping=damping,
            scale=scale,
            exact=exact,
            device=device,
        )
        self.features = features
        self.exact = exact
        self.scheduler_config = scheduler_config
        self.model_id = model_id
        self.batch_size, self.chunk_size, self.progress = batch_size, chunk_size, progress
        identity = {
            "features": features.identity(),
            "projector": self.computer.projector.to_dict(),
        }
        self.directory = (
            out_dir / "features" / model_id[:16] / f"{kind}-{'exact-' * exact}{_digest(identity)}"
        )

    def __call__(
        self, dataset: ImageDataset, role: Literal["train", "query"]
    ) -> FeatureStore | ShardedStore | StreamedFeatures:
        """Featurise ``dataset``: a store (projected route), or streamed features (exact).

        The training images are split over the ranks of a distributed job; queries are each
        rank's own.
        """
        path = self.directory / f"{role}-{dataset.fingerprint()[:16]}"
        common = {"model_id": self.model_id, "batch_size": self.batch_size}
        if self.exact:
            return StreamedFeatures(
                self.computer, self.scheduler_config, dataset, self.features, path=path, **common
            )
        store_options = {**common, "chunk_size": self.chunk_size, "progress": self.progress}
        if role == "query" or not self.distributed.active:
            return featurize_preconditioned(
                self.computer, self.scheduler_config, dataset, self.features, path, **store_options
            )
        own = dataset.select(dataset.ids[self.distributed.block(len(dataset))])
        featurize_preconditioned(
            self.computer,
            self.scheduler_config,
            own,
            self.features,
            path / part_name(self.distributed),
            **store_options,
        )
        self.distributed.barrier()
        parts = [
            FeatureStore.open(path / part_name(self.distributed, rank))
            for rank in range(self.distributed.world_size)
        ]
        return ShardedStore(parts, self.distributed)


def stage_directory(
    out_dir: str | Path,
    features: FeatureConfig,
    estimate: CurvatureConfig,
    train: ImageDataset,
    model_id: str,
) -> Path:
    """Where :class:`PreconditionedFeaturizer` keeps the curvature of a run directory.

    ``out_dir/curvature/<weights>/<settings>``: one estimate per model, plan, parameters,
    precision, estimation settings and training set, shared by every curvature method.
    """
    tag = _digest(
        {
            "plan": features.plan.to_dict(),
            "parameters": features.parameters,
            "dtype": features.dtype,
            "mixed_precision": features.mixed_precision,
            "estimate": estimate.to_dict(),
            "data": train.fingerprint(),
        }
    )
    return Path(out_dir) / "curvature" / model_id[:16] / tag


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
