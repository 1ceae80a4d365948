"""Helpers shared by the model tests: tiny specs, recipes and datasets that train in ms."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from diffattr.data import ImageDataset
from diffattr.models import ModelSpec, TrainConfig, build_model, model_spec

UNET_OVERRIDES: dict[str, Any] = {
    "block_out_channels": [8, 16],
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}
MLP_OVERRIDES: dict[str, Any] = {"width": 32, "depth": 1}
CUSTOM_FACTORY = "tests.models.custom_model:make"


def unet_spec(in_channels: int = 1, sample_size: int = 8) -> ModelSpec:
    return model_spec(
        "unet-tiny", in_channels=in_channels, sample_size=sample_size, overrides=UNET_OVERRIDES
    )


def mlp_spec(in_channels: int = 1, sample_size: int = 8) -> ModelSpec:
    return model_spec(
        "mlp-tiny", in_channels=in_channels, sample_size=sample_size, overrides=MLP_OVERRIDES
    )


def tiny_config(**changes: Any) -> TrainConfig:
    """Six steps of 16 images, a checkpoint every three steps."""
    settings: dict[str, Any] = {
        "steps": 6,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "seed": 0,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def random_dataset(
    n: int = 16, channels: int = 1, size: int = 8, seed: int = 0, name: str = "noise"
) -> ImageDataset:
    """Uniform noise images in [-1, 1] with ids that are not positions."""
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, channels, size, size), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=np.arange(n, dtype=np.int64) * 7 + 3, name=name)


def seeded_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """Build a model with a seeded initialisation, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec).eval()


def fixed_input(shape: tuple[int, ...] = (4, 1, 8, 8), seed: int = 123) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cunet_spec(name: str = "cunet-tiny", channels: int = 1, size: int = 8) -> ModelSpec:
    """A text-conditioned UNet (or latent one) small enough to train in tests."""
    spec = model_spec(name, in_channels=channels, sample_size=size)
    unet = {
        **spec.config["unet"],
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
        "attention_head_dim": 4,
        "cross_attention_dim": 8,
    }
    config = {**spec.config, "unet": unet, "text": {"max_length": 16}}
    if "vae" in config:
        config["vae"] = {**config["vae"], "block_out_channels": [8, 16], "norm_num_groups": 4}
    return ModelSpec(name=spec.name, config=config)


def prompted_dataset(n: int = 16, seed: int = 0, size: int = 8, channels: int = 1) -> ImageDataset:
    """Noise images with the prompts "a handwritten <label>", labels 0..4 in turn."""
    images = random_dataset(n=n, channels=channels, size=size, seed=seed)
    labels = np.arange(n) % 5
    return ImageDataset(
        images=images.images,
        ids=images.ids,
        name="prompted",
        labels=labels,
        prompts=tuple(f"a handwritten {label}" for label in labels),
    )
