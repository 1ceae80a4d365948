"""Diffusion models: a registry of configurations, training, sampling and checkpoints."""

from diffattr.models._checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from diffattr.models._mlp import ResidualMLP
from diffattr.models._registry import (
    ModelSpec,
    available_models,
    build_model,
    count_parameters,
    model_spec,
    predict,
)
from diffattr.models._sampling import DEFAULT_STEPS, sample, sample_checkpoint, save_samples
from diffattr.models._training import (
    TrainConfig,
    default_scheduler_config,
    diffusion_target,
    train,
)

__all__ = [
    "DEFAULT_STEPS",
    "Checkpoint",
    "ModelSpec",
    "ResidualMLP",
    "TrainConfig",
    "available_models",
    "build_model",
    "count_parameters",
    "default_scheduler_config",
    "diffusion_target",
    "load_checkpoint",
    "model_spec",
    "predict",
    "sample",
    "sample_checkpoint",
    "save_checkpoint",
    "save_samples",
    "train",
]
