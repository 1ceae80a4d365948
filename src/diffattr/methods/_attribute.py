"""One call from checkpoints and images to scores: :class:`Attribution` in a single step."""

from __future__ import annotations

import os
from collections.abc import Sequence

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.features import FeatureConfig
from diffattr.methods._base import Method
from diffattr.methods._run import Attribution
from diffattr.methods._scores import Scores
from diffattr.models import Checkpoint, Pipeline


def attribute(
    method: Method,
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

    The same as ``Attribution(out_dir, checkpoints, train, features, ...).score(method,
    queries)``: features, the method's fit and the scores are kept under ``out_dir`` (see
    :class:`~diffattr.methods.Attribution`) and reused by a rerun.

    Args:
        method: A configured method, e.g. ``DAS(DASConfig())`` or ``NDA()``.
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
    run = Attribution(
        out_dir,
        list(checkpoints),
        train,
        features,
        batch_size=batch_size,
        chunk_size=chunk_size,
        device=device,
        progress=progress,
    )
    return run.score(method, queries)
