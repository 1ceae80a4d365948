"""Retraining like a base: counterfactuals on a LoRA fine-tune and on a latent model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset, load_digits, split_dataset
from diffattr.errors import ConfigError
from diffattr.evaluation import CounterfactualConfig, counterfactual, retrain_like
from diffattr.models import (
    Checkpoint,
    LoRAConfig,
    ModelSpec,
    TrainConfig,
    VAEConfig,
    load_checkpoint,
    sample_checkpoint,
    train,
    train_vae,
)
from tests.models.helpers import cunet_spec

RECIPE = TrainConfig(steps=3, batch_size=8, checkpoint_every=0)
# Nothing removed only: the one retrain that must repeat the base exactly.
CONFIG = CounterfactualConfig(k=2, n_random=0, sampler="ddim", sampling_steps=2, guidance_scale=2.0)
PROMPTS = "a handwritten {label}"


def _split(size: int | None = None):
    digits = load_digits(size=size, prompts=PROMPTS)
    return split_dataset(digits.select(digits.ids[100:116]), query_fraction=0.25, seed=0)


def _queries(base: Checkpoint) -> ImageDataset:
    seeds, prompts = [1, 2], ["a handwritten 3", "a handwritten 7"]
    images = sample_checkpoint(
        base,
        seeds,
        sampler="ddim",
        num_inference_steps=2,
        prompts=prompts,
        guidance_scale=2.0,
        progress=False,
    )
    return ImageDataset(images=images, ids=np.array(seeds), name="generated", prompts=prompts)


def _retrained(base: Checkpoint, out: Path) -> Checkpoint:
    """Run the counterfactual with nothing removed; return its retrained model."""
    result = counterfactual(base, _queries(base), {}, CONFIG, out, keep_models=True, progress=False)
    # Retraining like the base with nothing removed repeats it exactly.
    np.testing.assert_array_equal(result.control_l2, [0.0, 0.0])
    return load_checkpoint(out / "models" / "none")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Checkpoint]:
    root = tmp_path_factory.mktemp("retrain-lora")
    digits = load_digits(prompts=PROMPTS)
    pretrained = train(
        cunet_spec(), digits.select(digits.ids[:16]), RECIPE, root / "pretrained", progress=False
    )
    split = _split()
    spec = pretrained.model_spec.with_lora(LoRAConfig(rank=2))
    base = train(
        spec, split.train, RECIPE, root / "lora", split=split, init=pretrained, progress=False
    )
    return pretrained, base


def test_counterfactual_on_a_lora_fine_tune_starts_from_its_pretrained_model(
    lora: tuple[Checkpoint, Checkpoint], tmp_path: Path
) -> None:
    pretrained, base = lora
    retrained = _retrained(base, tmp_path)
    # The same adapters on the same pretrained model.
    assert retrained.model_spec == pretrained.model_spec.with_lora(LoRAConfig(rank=2))
    assert retrained.metadata["init"]["weights"] == pretrained.weights_id()
    # Base weights are the pretrained EMA ones, under peft's base_layer names.
    tuned = retrained.load_state("model")
    for key, value in pretrained.load_state("ema").items():
        layer = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(tuned[key if key in tuned else layer], value, rtol=0, atol=0)


def test_retrain_like_refuses_an_init_that_is_not_the_bases(
    lora: tuple[Checkpoint, Checkpoint], tmp_path: Path
) -> None:
    _, base = lora
    subset = base.training_data()
    with pytest.raises(ConfigError, match="pass the init it records"):
        retrain_like(base, subset, tmp_path / "none", init=None)
    with pytest.raises(ConfigError, match="pass the init it records"):
        retrain_like(base, subset, tmp_path / "other", init=base)


def test_counterfactual_on_a_latent_model_loads_its_autoencoder(tmp_path: Path) -> None:
    split = _split(size=16)
    config = cunet_spec("ldm-tiny", size=16).config
    vae = train_vae(
        split.train,
        VAEConfig(steps=2, batch_size=8),
        tmp_path / "vae",
        spec=ModelSpec(name="vae-tiny", config=config["vae"]),
        progress=False,
    )
    spec = ModelSpec(
        name="ldm-tiny", config={**config, "latent_scale": vae.metadata["latent_scale"]}
    )
    base = train(spec, split.train, RECIPE, tmp_path / "ldm", split=split, init=vae, progress=False)
    retrained = _retrained(base, tmp_path / "cf")
    assert retrained.metadata["init"]["weights"] == vae.weights_id()
    autoencoder = retrained.load_model().vae.state_dict()
    for key, value in vae.load_state("model").items():
        torch.testing.assert_close(autoencoder[key], value, rtol=0, atol=0)
