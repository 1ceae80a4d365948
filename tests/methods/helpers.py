"""Tiny models, datasets and a cache of feature stores for the method tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffattr.data import ImageDataset
from diffattr.features import FeatureConfig, FeatureStore, PlanConfig, ProjectionConfig, featurize
from diffattr.models import build_model, default_scheduler_config, model_spec

SPEC = model_spec("mlp-tiny", in_channels=1, sample_size=8, overrides={"width": 16, "depth": 1})
N_TRAIN, N_QUERY = 16, 5
PLAN = PlanConfig(strategy="uniform", num_steps=2, seed=1)
PROJECTION = ProjectionConfig(kind="dense", dim=16, seed=2)
#: Features as a user would make them (float32) and for the numerical oracles (float64).
BASE = FeatureConfig(plan=PLAN, projection=PROJECTION)
BASE64 = FeatureConfig(plan=PLAN, projection=PROJECTION, dtype="float64")


def make_model(seed: int = 0) -> nn.Module:
    """The tiny residual MLP with a random (not zero) output layer: every gradient is nonzero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(SPEC)
        nn.init.normal_(model.output.weight, std=0.1)
        nn.init.normal_(model.output.bias, std=0.1)
    return model.eval()


def make_dataset(n: int, seed: int, first_id: int) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, 8, 8), generator=draw) * 2 - 1
    ids = first_id + 3 * np.arange(n, dtype=np.int64)
    return ImageDataset(images=images, ids=ids, name=f"noise{seed}")


DATASETS = {
    "train": make_dataset(N_TRAIN, seed=0, first_id=5),
    "query": make_dataset(N_QUERY, seed=1, first_id=1000),
}


class StoreFactory:
    """Featurise (once) the train or query images of a checkpoint with a feature config."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[int, nn.Module] = {}
        self._stores: dict[str, FeatureStore] = {}

    def model(self, seed: int) -> nn.Module:
        if seed not in self._models:
            self._models[seed] = make_model(seed)
        return self._models[seed]

    def __call__(
        self,
        features: FeatureConfig,
        part: str = "train",
        *,
        checkpoint: int = 0,
        dataset: ImageDataset | None = None,
    ) -> FeatureStore:
        data = DATASETS[part] if dataset is None else dataset
        description = json.dumps(
            [features.to_dict(), part, checkpoint, data.fingerprint()], sort_keys=True
        )
        key = hashlib.sha256(description.encode()).hexdigest()[:16]
        if key not in self._stores:
            self._stores[key] = featurize(
                self.model(checkpoint),
                default_scheduler_config(),
                data,
                features,
                self.root / key,
                model_id=f"checkpoint-{checkpoint}",
                batch_size=4,
                chunk_size=8,
                progress=False,
            )
        return self._stores[key]


def features_of(store: FeatureStore) -> np.ndarray:
    """The (N, r, k) features as float64."""
    return np.asarray(store.array("features"), dtype=np.float64)
