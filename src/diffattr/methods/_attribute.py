"""One call from checkpoints and images to scores: featurise (resumable), fit, score, save."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError
from diffattr.features import Distributed, FeatureConfig, featurize, featurize_sharded
from diffattr.methods._base import AttributionMethod, Features
from diffattr.methods._scores import Scores
from diffattr.methods._tracin import TracIn
from diffattr.models import Checkpoint, Pipeline, TrainConfig


def attribute(
    method: AttributionMethod,
    checkpoints: Sequence[Checkpoint | Pipeline],
    train: ImageDataset,
    queries: ImageDataset,
    features: FeatureConfig,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    chunk_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> Scores:
    """Attribute ``queries`` to ``train`` with ``method``, over one or more checkpoints.

    Feature stores are kept under ``out_dir/features/<weights>/<settings>/<data>/`` and resumed
    on a rerun; the scores are saved to ``out_dir/scores/<method>/``.

    Inside an initialised ``torch.distributed`` job (e.g. under torchrun) every rank must call
    it alike: each featurises its block of the training images into its own part store, the
    kernel is reduced over the ranks, each rank featurises and scores its block of the queries,
    and rank 0 gathers and saves the scores, which every rank returns.

    Args:
        method: A configured method, e.g. ``DAS(DASConfig())``.
        checkpoints: One or more checkpoints (several form an ensemble; TracIn's learning
            rates default to each checkpoint's rate at its step), or a local diffusers
            :class:`~diffattr.models.Pipeline`. Conditional models need prompts on ``train``
            and ``queries``.
        train: The training images whose influence is measured.
        queries: The images to explain (generated or held-out).
        features: Plan, projection, parameter selection and precision; the method sets the
            output function and normalisation it needs.
        out_dir: Run directory.
        batch_size: Images per gradient batch.
        chunk_size: Images per store chunk (the unit of resumption).
        device: Where to compute.
        progress: Show progress bars.

    Returns:
        The scores, (n_query, n_train), also saved.
    """
    if not checkpoints:
        raise ConfigError("attribute needs at least one checkpoint")
    if queries.images.shape[1:] != train.images.shape[1:]:
        # Checked before any featurisation, which may take long.
        raise DataError(
            f"query images {tuple(queries.images.shape[1:])} differ from the training images "
            f"{tuple(train.images.shape[1:])}"
        )
    method_features = method.features(features)
    out_dir = Path(out_dir)
    if isinstance(method, TracIn) and method.config.learning_rates is None:
        rates = tuple(_learning_rate(c) for c in checkpoints)
        method = type(method)(replace(method.config, learning_rates=rates))
    distributed = Distributed.current()
    own_ids = queries.ids[distributed.block(len(queries))]
    own_queries = queries.select(own_ids) if len(own_ids) else None
    train_stores: list[Features] = []
    query_stores: list[Features] = []
    for checkpoint in checkpoints:
        model_id = checkpoint.weights_id()
        model = checkpoint.load_model(device=device)
        base = out_dir / "features" / model_id[:16] / _settings_tag(method_features)
        common = {
            "model_id": model_id,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
            "device": device,
            "progress": progress,
        }
        train_path = base / ("train-" + train.fingerprint()[:16])
        featurize_train = (
            partial(featurize_sharded, distributed=distributed) if distributed.active else featurize
        )
        train_stores.append(
            featurize_train(
                model, checkpoint.scheduler_config, train, method_features, train_path, **common
            )
        )
        if own_queries is not None:
            query_path = base / ("query-" + own_queries.fingerprint()[:16])
            query_stores.append(
                featurize(
                    model,
                    checkpoint.scheduler_config,
                    own_queries,
                    method_features,
                    query_path,
                    **common,
                )
            )
    method.fit(train_stores)
    local = method.score(query_stores) if own_queries is not None else None
    scores = _gather(local, distributed)
    if distributed.rank == 0:
        scores.save(out_dir / "scores" / method.name)
    distributed.barrier()
    return scores


def _gather(local: Scores | None, distributed: Distributed) -> Scores:
    """All ranks' score rows, in rank order (ranks without queries send None)."""
    pieces = [p for p in distributed.all_gather(local) if p is not None]
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    return Scores(
        values=np.concatenate([p.values for p in pieces]),
        query_ids=np.concatenate([p.query_ids for p in pieces]),
        train_ids=first.train_ids,
        method=first.method,
        settings={**first.settings, "world_size": distributed.world_size},
    )


def _settings_tag(features: FeatureConfig) -> str:
    digest = hashlib.sha256(json.dumps(features.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"{features.output.kind}-{digest[:12]}"


def _learning_rate(checkpoint: Checkpoint) -> float:
    training = checkpoint.metadata.get("training")
    if not training:
        raise ConfigError(
            f"{checkpoint.path} records no training recipe: give TracIn's learning_rates"
        )
    return TrainConfig.from_dict(training).learning_rate_at(max(checkpoint.step - 1, 0))
