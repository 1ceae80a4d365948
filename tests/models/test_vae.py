from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from diffattr._seed import derive_seed
from diffattr.data import ImageDataset, load_digits
from diffattr.errors import CheckpointError, ConfigError
from diffattr.models import (
    Checkpoint,
    ModelSpec,
    VAEConfig,
    count_parameters,
    decode_latents,
    encode_latents,
    load_vae,
    train_vae,
    vae_latent_scale,
    vae_tiny_config,
)

from .helpers import random_dataset, states_equal


@pytest.fixture(scope="module")
def digits16() -> ImageDataset:
    """128 digits at 16x16: 8 batches of 16 per epoch."""
    return load_digits(size=16).select(np.arange(128))


def _config(**changes: object) -> VAEConfig:
    settings: dict[str, object] = {"steps": 4, "batch_size": 16, "seed": 0}
    settings.update(changes)
    return VAEConfig(**settings)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory: pytest.TempPathFactory, digits16: ImageDataset) -> Checkpoint:
    """60 steps (~7 epochs) on the 128 digits; read-only."""
    out = tmp_path_factory.mktemp("vae") / "ckpt"
    return train_vae(digits16, _config(steps=60), out, progress=False)


def _rmse(vae: AutoencoderKL, images: torch.Tensor) -> float:
    decoded = decode_latents(vae, encode_latents(vae, images, 1.0), 1.0)
    return (decoded - images).square().mean().sqrt().item()


# --- VAEConfig -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("kl_weight", -1e-4),
        ("kl_weight", math.nan),
        ("kl_weight", math.inf),
    ],
)
def test_vae_config_rejects_invalid_fields(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"VAEConfig\.{field}=.* is invalid: must be "):
        VAEConfig(**{field: value})


def test_vae_config_round_trips_and_rejects_unknown_keys() -> None:
    config = VAEConfig(steps=10, kl_weight=0.0, seed=3)
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"VAEConfig has no fields \['warmup_steps'\]"):
        VAEConfig.from_dict({**config.to_dict(), "warmup_steps": 1})


def test_learning_rate_warms_up_over_five_percent_then_stays_constant() -> None:
    config = VAEConfig(steps=100, learning_rate=1e-3)
    rates = [config.learning_rate_at(step) for step in range(100)]
    assert rates[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert rates[5:] == [1e-3] * 95
    assert VAEConfig(steps=5).learning_rate_at(0) == 1e-3


# --- model ---------------------------------------------------------------------------------------


def test_tiny_config_builds_a_2x_downsampling_vae() -> None:
    vae = AutoencoderKL(**vae_tiny_config(1, 16)).eval()
    assert count_parameters(vae) == 657_221
    latents = encode_latents(vae, torch.zeros(2, 1, 16, 16), 1.0)
    assert latents.shape == (2, 4, 8, 8)
    assert decode_latents(vae, latents, 1.0).shape == (2, 1, 16, 16)


# --- train_vae -----------------------------------------------------------------------------------


def test_training_reduces_reconstruction_error(
    trained_vae: Checkpoint, digits16: ImageDataset
) -> None:
    # The same initialisation as the trained VAE's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "init"))
        untrained = AutoencoderKL(**trained_vae.model_spec.config).eval()
    vae = load_vae(trained_vae)
    before, after = _rmse(untrained, digits16.images), _rmse(vae, digits16.images)
    # Measured (seeds 0, 1, 2): 0.71, 0.75, 0.82 untrained; 0.125, 0.131, 0.150 after 60 steps.
    assert after < 0.3 * before
    assert trained_vae.metadata["reconstruction_rmse"] == pytest.approx(after, rel=1e-5)


def test_checkpoint_records_recipe_data_and_scale(
    trained_vae: Checkpoint, digits16: ImageDataset
) -> None:
    meta = trained_vae.metadata
    assert trained_vae.model_spec == ModelSpec(name="vae-tiny", config=vae_tiny_config(1, 16))
    assert trained_vae.step == 60
    assert trained_vae.scheduler_config == {}
    assert VAEConfig.from_dict(meta["vae_training"]) == _config(steps=60)
    assert meta["dataset"]["fingerprint"] == digits16.fingerprint()
    assert meta["n_parameters"] == 657_221
    assert vae_latent_scale(trained_vae) == meta["latent_scale"] > 0


def test_scaled_latents_have_unit_std_and_decode_to_images(
    trained_vae: Checkpoint, digits16: ImageDataset
) -> None:
    vae, scale = load_vae(trained_vae), vae_latent_scale(trained_vae)
    latents = encode_latents(vae, digits16.images, scale)
    assert latents.shape == (128, 4, 8, 8)
    assert not latents.requires_grad
    assert latents.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(latents, encode_latents(vae, digits16.images, scale))
    images = decode_latents(vae, 3 * latents, scale)
    assert images.shape == (128, 1, 16, 16)
    assert images.min() >= -1.0
    assert images.max() <= 1.0


def test_same_seed_gives_identical_weights(tmp_path: Path, digits16: ImageDataset) -> None:
    rng_before = torch.get_rng_state()
    first = train_vae(digits16, _config(), tmp_path / "a", progress=False)
    again = train_vae(digits16, _config(), tmp_path / "b", progress=False)
    other = train_vae(digits16, _config(seed=1), tmp_path / "c", progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert states_equal(first.load_state("model"), again.load_state("model"))
    assert not states_equal(first.load_state("model"), other.load_state("model"))
    assert first.metadata["latent_scale"] == again.metadata["latent_scale"]


def test_rerun_returns_existing_checkpoint_and_refuses_another_recipe(
    tmp_path: Path, digits16: ImageDataset
) -> None:
    out = tmp_path / "vae"
    first = train_vae(digits16, _config(), out, progress=False)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert train_vae(digits16, _config(), out, progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files
    with pytest.raises(CheckpointError, match=r"holds a different run \(its vae_training differ\)"):
        train_vae(digits16, _config(kl_weight=0.0), out, progress=False)
    with pytest.raises(CheckpointError, match=r"its dataset differ"):
        train_vae(digits16.select(np.arange(64)), _config(), out, progress=False)
    redone = train_vae(digits16, _config(kl_weight=0.0), out, progress=False, overwrite=True)
    assert redone.metadata["vae_training"]["kl_weight"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.json",
        "model-00000004.safetensors",
    ]


def test_refuses_a_diffusion_checkpoint_directory(trained: Checkpoint) -> None:
    data = load_digits(size=16).select(np.arange(16))
    with pytest.raises(CheckpointError, match="holds a different run"):
        train_vae(data, _config(), trained.path, progress=False)


@pytest.mark.parametrize(("channels", "size"), [(1, 15), (3, 16)])
def test_rejects_data_that_does_not_fit(tmp_path: Path, channels: int, size: int) -> None:
    data = random_dataset(n=16, channels=channels, size=size)
    spec = ModelSpec(name="vae-tiny", config=vae_tiny_config(1, 16))
    expected = "downsamples by 2, .* 15x15 images" if size == 15 else "takes 1-channel images"
    with pytest.raises(ConfigError, match=expected):
        train_vae(data, _config(), tmp_path / "vae", spec=spec, progress=False)
    assert not (tmp_path / "vae").exists()


def test_rejects_a_spec_that_does_not_build(tmp_path: Path, digits16: ImageDataset) -> None:
    spec = ModelSpec(name="vae-bad", config={**vae_tiny_config(1, 16), "norm_num_groups": 5})
    with pytest.raises(ConfigError, match="cannot build VAE 'vae-bad'"):
        train_vae(digits16, _config(), tmp_path / "vae", spec=spec, progress=False)


# --- loading -------------------------------------------------------------------------------------


def test_load_vae_is_strict(trained_vae: Checkpoint) -> None:
    wider = {**trained_vae.model_spec.config, "latent_channels": 8}
    mismatched = dataclasses.replace(trained_vae, model_spec=ModelSpec(name="vae", config=wider))
    expected = re.escape(f"{trained_vae.path}: VAE weights do not fit the model (AutoencoderKL)")
    with pytest.raises(CheckpointError, match=expected):
        load_vae(mismatched)
    rng_before = torch.get_rng_state()
    assert not load_vae(trained_vae).training
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_diffusion_checkpoints_are_not_vaes(trained: Checkpoint) -> None:
    with pytest.raises(CheckpointError, match="is not a VAE checkpoint"):
        vae_latent_scale(trained)
    with pytest.raises(CheckpointError, match="does not build an AutoencoderKL"):
        load_vae(trained)
