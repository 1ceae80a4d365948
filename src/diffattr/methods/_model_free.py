"""The model-free methods as registry members: NDA, pixel cosine and the random baseline.

Each wraps its scoring function (``nda_scores``, ``pixel_cosine_scores``, ``random_scores``) in
the :class:`~diffattr.methods.ModelFreeMethod` protocol, so a run, the command line, the LDS
table and the counterfactual treat them as they treat DAS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffattr._config import is_int
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.methods._base import ModelFreeMethod
from diffattr.methods._nda import NDAConfig, nda_scores
from diffattr.methods._scores import Scores
from diffattr.methods._similarity import pixel_cosine_scores, random_scores


class NDA(ModelFreeMethod):
    """Noise-based data attribution: patch matching of the query's noised versions (no model)."""

    name = "nda"
    config_cls = NDAConfig

    def score_images(
        self,
        queries: ImageDataset,
        train: ImageDataset,
        *,
        scheduler_config: dict[str, Any],
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> Scores:
        return nda_scores(
            queries,
            train,
            self.config,
            scheduler_config=scheduler_config,
            device=device,
            progress=progress,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PixelCosineConfig:
    """Pixel cosine similarity has no settings."""


class PixelCosine(ModelFreeMethod):
    """Cosine similarity of the flattened pixels: the baseline every gradient method must beat."""

    name = "pixel-cos"
    config_cls = PixelCosineConfig

    def score_images(
        self,
        queries: ImageDataset,
        train: ImageDataset,
        *,
        scheduler_config: dict[str, Any],
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> Scores:
        return pixel_cosine_scores(queries, train)


@dataclass(frozen=True, kw_only=True, slots=True)
class RandomConfig:
    """Settings of the chance baseline."""

    seed: int = field(default=0, metadata={"help": "seed of the random scores"})

    def __post_init__(self) -> None:
        if not is_int(self.seed):
            raise ConfigError(f"RandomConfig.seed={self.seed!r} is invalid: must be an integer")


class Random(ModelFreeMethod):
    """Independent standard normal scores: the chance level of every evaluation."""

    name = "random"
    config_cls = RandomConfig

    def score_images(
        self,
        queries: ImageDataset,
        train: ImageDataset,
        *,
        scheduler_config: dict[str, Any],
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> Scores:
        return random_scores(queries, train, seed=self.config.seed)
