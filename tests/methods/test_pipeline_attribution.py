"""End to end: a saved Stable-Diffusion pipeline with a LoRA fine-tune, attributed by DAS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset
from diffattr.errors import DataError
from diffattr.features import FeatureConfig, FeatureStore, PlanConfig, ProjectionConfig
from diffattr.methods import DAS, attribute
from diffattr.models import Pipeline, load_pipeline, lora_parameter_names
from tests.models.pipeline_helpers import offline, save_lora_for, save_sd_pipeline  # noqa: F401

# `offline` is an autouse fixture: no hub access here either.

PLAN = PlanConfig(strategy="uniform", num_steps=2, seed=1)
PROMPTS = ("a cat", "a dog", "a red cat", "the sea", "a cat and a dog", "sky", "", "a bird")


def prompted_images(n: int, seed: int, first_id: int) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, 16, 16), generator=draw) * 2 - 1
    ids = first_id + np.arange(n, dtype=np.int64)
    prompts = tuple(PROMPTS[(seed + i) % len(PROMPTS)] for i in range(n))
    return ImageDataset(images=images, ids=ids, name=f"prompted{seed}", prompts=prompts)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny pipeline with a random adapter (non-zero B: non-trivial adapter gradients)."""
    root = tmp_path_factory.mktemp("pipeline")
    path = save_sd_pipeline(root)
    # Saved in the pipeline folder, where load_pipeline finds it.
    save_lora_for(load_pipeline(path).load_model(), path)
    return load_pipeline(path)


@pytest.fixture(scope="module")
def lora_count(pipeline: Pipeline) -> int:
    model = pipeline.load_model()
    return sum(model.get_parameter(name).numel() for name in lora_parameter_names(model))


TRAIN = prompted_images(8, seed=0, first_id=0)
QUERIES = prompted_images(3, seed=1, first_id=100)


def _stores(run: Path) -> list[FeatureStore]:
    return [FeatureStore.open(p.parent) for p in sorted(run.glob("features/*/*/*/manifest.json"))]


@pytest.mark.parametrize(
    "features",
    [
        FeatureConfig(plan=PLAN, projection=ProjectionConfig(kind="dense", dim=32)),
        FeatureConfig(
            plan=PLAN, projection=ProjectionConfig(kind="kronecker", dim=32), backend="factored"
        ),
    ],
    ids=["vmap-dense", "factored-kronecker"],
)
def test_das_attributes_over_the_lora_parameters(
    pipeline: Pipeline, lora_count: int, features: FeatureConfig, tmp_path: Path
) -> None:
    assert pipeline.lora is not None
    scores = attribute(DAS(), [pipeline], TRAIN, QUERIES, features, tmp_path, progress=False)
    assert scores.values.shape == (3, 8)
    assert np.isfinite(scores.values).all()
    assert np.abs(scores.values).max() > 0
    np.testing.assert_array_equal(scores.train_ids, TRAIN.ids)
    stores = _stores(tmp_path)
    assert len(stores) == 2
    for store in stores:
        assert store.settings["parameter_count"] == lora_count
        assert store.settings["model_id"] == pipeline.weights_id()


def test_train_images_without_prompts(pipeline: Pipeline, tmp_path: Path) -> None:
    unprompted = ImageDataset(images=TRAIN.images, ids=TRAIN.ids, name="unprompted")
    features = FeatureConfig(plan=PLAN, projection=ProjectionConfig(kind="dense", dim=32))
    with pytest.raises(DataError, match="need a prompt each"):
        attribute(DAS(), [pipeline], unprompted, QUERIES, features, tmp_path, progress=False)
