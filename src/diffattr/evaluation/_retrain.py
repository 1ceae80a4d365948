"""Retrain like a base model: its spec, scheduler, recipe and starting point, on other images.

LDS subset models and counterfactual retrains both repeat a base's training on part of its
data. Everything "like the base" means is here, so that neither can drop a piece of it (such as
the pretrained model a LoRA fine-tune starts from, or a latent model's autoencoder).
"""

from __future__ import annotations

import os

import torch

from diffattr.data import ImageDataset
from diffattr.errors import CheckpointError, ConfigError
from diffattr.models import Checkpoint, TrainConfig, load_checkpoint, train


def recorded_recipe(base: Checkpoint) -> TrainConfig:
    """The training recipe ``base`` records.

    Raises:
        CheckpointError: ``base`` records none (e.g. it was imported rather than trained).
    """
    recipe = base.metadata.get("training")
    if not recipe:
        raise CheckpointError(f"{base.path} records no training recipe to repeat")
    return TrainConfig.from_dict(recipe)


def recorded_init(base: Checkpoint, *, trust_remote_code: bool = False) -> Checkpoint | None:
    """The checkpoint ``base`` started from, as it records it, or None if it started afresh.

    That is the pretrained model of a LoRA or full fine-tune, or the autoencoder of a latent
    model (see :func:`~diffattr.models.train`'s ``init``).

    Args:
        base: A trained checkpoint.
        trust_remote_code: Allow an init whose model is an importable ``module:factory``; see
            :func:`~diffattr.models.load_checkpoint`.

    Raises:
        CheckpointError: The recorded init is missing, damaged, or its weights have changed
            since ``base`` was trained from it.
    """
    record = base.metadata.get("init")
    if not record:
        return None
    init = load_checkpoint(record["path"], trust_remote_code=trust_remote_code)
    if init.weights_id() != record["weights"]:
        raise CheckpointError(
            f"{init.path}, the model {base.path} was trained from, has changed since (its "
            "weights differ from the recorded ones)"
        )
    return init


def retrain_like(
    base: Checkpoint,
    subset: ImageDataset,
    out_dir: str | os.PathLike[str],
    *,
    init: Checkpoint | None,
    recipe: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Checkpoint:
    """Train a model as ``base`` was trained, on ``subset`` instead of its training set.

    The model spec (LoRA adapters included), the noise scheduler and the starting point are the
    base's; ``init`` is required and checked rather than looked up here, so that callers open it
    once (and from where they choose: an LDS benchmark keeps its own copy) and a forgotten one
    is an error, not a model trained from scratch.

    Args:
        base: The checkpoint to repeat.
        subset: The training images (with prompts for a conditional model).
        out_dir: Checkpoint directory; an interrupted run there resumes (see
            :func:`~diffattr.models.train`).
        init: The checkpoint ``base`` started from, already opened (e.g. by
            :func:`recorded_init`, or a copy of it); None only if ``base`` started afresh.
        recipe: The recipe, e.g. the base's with another length or seed (default: the base's,
            :func:`recorded_recipe`).
        device: Where to train.
        progress: Show a progress bar.

    Returns:
        The retrained checkpoint.

    Raises:
        CheckpointError: No recipe given and ``base`` records none.
        ConfigError: ``init`` is not the checkpoint ``base`` started from (by weights hash).
    """
    record = base.metadata.get("init")
    wanted = record["weights"] if record else None
    given = init.weights_id() if init is not None else None
    if given != wanted:
        started = f"the weights {wanted}" if wanted else "scratch"
        holds = f"{init.path} holds weights {given}" if init is not None else "init=None"
        raise ConfigError(
            f"{base.path} was trained from {started}, but {holds}; pass the init it records "
            "(see recorded_init)"
        )
    return train(
        base.model_spec,
        subset,
        recipe if recipe is not None else recorded_recipe(base),
        out_dir,
        scheduler_config=base.scheduler_config,
        init=init,
        device=device,
        progress=progress,
    )
