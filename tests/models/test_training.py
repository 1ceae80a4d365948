from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import DatasetSplit, ImageDataset, load_digits
from diffattr.errors import CheckpointError, ConfigError
from diffattr.models import (
    Checkpoint,
    TrainConfig,
    default_scheduler_config,
    load_checkpoint,
    model_spec,
    train,
)

from . import custom_model
from .helpers import mlp_spec, random_dataset, states_equal, tiny_config, unet_spec


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def _run(out: Path, split: DatasetSplit, **changes) -> Checkpoint:
    until = changes.pop("until", None)
    spec = changes.pop("spec", None) or unet_spec()
    return train(spec, split.train, tiny_config(**changes), out, until=until, progress=False)


# --- TrainConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("weight_decay", -0.1),
        ("warmup_steps", -1),
        ("warmup_steps", 100),
        ("ema_decay", 0.0),
        ("ema_decay", 1.0),
        ("grad_clip", 0.0),
        ("checkpoint_every", -1),
        ("condition_dropout", -0.1),
        ("condition_dropout", 1.0),
    ],
)
def test_train_config_rejects_invalid_fields(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}=") as info:
        TrainConfig(**{"steps": 100, "warmup_steps": 10, field: value})
    assert isinstance(info.value, ValueError)


def test_train_config_warmup_must_be_shorter_than_training() -> None:
    with pytest.raises(
        ConfigError, match="warmup_steps=10 is invalid: must be None or 0 <= warmup_steps < steps"
    ):
        TrainConfig(steps=10, warmup_steps=10)
    assert TrainConfig(steps=10, warmup_steps=9).warmup_steps == 9


def test_train_config_accepts_optional_none() -> None:
    config = TrainConfig(
        steps=5, warmup_steps=0, ema_decay=None, grad_clip=None, checkpoint_every=0
    )
    assert config.ema_decay is None
    assert config.grad_clip is None


def test_train_config_round_trips_through_json() -> None:
    config = TrainConfig(
        steps=50,
        batch_size=8,
        learning_rate=2e-4,
        weight_decay=0.01,
        warmup_steps=5,
        ema_decay=None,
        grad_clip=0.5,
        seed=9,
        checkpoint_every=10,
        condition_dropout=0.2,
    )
    data = config.to_dict()
    assert data == {
        "steps": 50,
        "batch_size": 8,
        "learning_rate": 2e-4,
        "weight_decay": 0.01,
        "warmup_steps": 5,
        "ema_decay": None,
        "grad_clip": 0.5,
        "seed": 9,
        "checkpoint_every": 10,
        "condition_dropout": 0.2,
    }
    assert TrainConfig.from_dict(json.loads(json.dumps(data))) == config
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_train_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"no fields \['epochs'\]"):
        TrainConfig.from_dict({"steps": 10, "epochs": 3})


def test_learning_rate_warms_up_then_decays() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3)
    rates = [config.learning_rate_at(step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4)  # lr / warmup_steps
    assert rates[4] == pytest.approx(5e-4)
    assert rates[9] == pytest.approx(1e-3)  # the peak is reached on the last warm-up step
    assert max(rates) == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(rates[:10]))
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[55] == pytest.approx(0.5e-3)  # half way through the cosine
    assert 0 < rates[-1] < 1e-6


def test_learning_rate_without_warmup_starts_at_the_peak() -> None:
    config = TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1)
    assert config.learning_rate_at(0) == pytest.approx(0.1)
    assert config.learning_rate_at(5) == pytest.approx(0.05)
    assert config.learning_rate_at(9) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_default_scheduler_is_the_papers_ddpm_schedule() -> None:
    config = default_scheduler_config()
    assert config["_class_name"] == "DDPMScheduler"
    assert config["num_train_timesteps"] == 1000
    assert (config["beta_start"], config["beta_end"]) == (1e-4, 0.02)
    assert config["beta_schedule"] == "linear"
    assert config["prediction_type"] == "epsilon"
    assert default_scheduler_config(50)["num_train_timesteps"] == 50


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights(tmp_path: Path, digits_split: DatasetSplit) -> None:
    torch.manual_seed(1)
    a = _run(tmp_path / "a", digits_split, steps=4, seed=3)
    torch.manual_seed(2)  # the global RNG plays no part
    b = _run(tmp_path / "b", digits_split, steps=4, seed=3)
    for role in ("model", "ema", "optimizer"):
        assert states_equal(a.load_state(role), b.load_state(role)), role


def test_different_seed_gives_different_weights(tmp_path: Path, digits_split: DatasetSplit) -> None:
    a = _run(tmp_path / "a", digits_split, steps=4, seed=3)
    b = _run(tmp_path / "b", digits_split, steps=4, seed=4)
    state_a, state_b = a.load_state("model"), b.load_state("model")
    assert state_a.keys() == state_b.keys()
    assert not any(torch.equal(state_a[k], state_b[k]) for k in state_a if state_a[k].numel() > 1)


def test_training_leaves_the_global_rng_alone(tmp_path: Path, digits_split: DatasetSplit) -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _run(tmp_path, digits_split, spec=mlp_spec(), steps=2)
    assert torch.equal(torch.get_rng_state(), before)


def test_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, digits_split: DatasetSplit
) -> None:
    # 56 images in batches of 16: 3 steps per epoch, so both halves cross an epoch boundary.
    straight = _run(tmp_path / "a", digits_split, steps=6, checkpoint_every=3)
    assert straight.step == 6

    half = _run(tmp_path / "b", digits_split, steps=6, checkpoint_every=3, until=3)
    assert half.step == 3
    assert set(half.files.values()) == {
        f"{r}-00000003.safetensors" for r in ("model", "ema", "optimizer")
    }
    assert not states_equal(half.load_state("model"), straight.load_state("model"))
    resumed = _run(tmp_path / "b", digits_split, steps=6, checkpoint_every=3)
    assert resumed.step == 6
    for role in ("model", "ema", "optimizer"):
        assert states_equal(resumed.load_state(role), straight.load_state(role)), role
    assert resumed.load_state("optimizer")["state.0.step"].item() == 6


def test_resume_refuses_a_different_recipe(tmp_path: Path, digits_split: DatasetSplit) -> None:
    _run(tmp_path, digits_split, spec=mlp_spec(), steps=6, until=3)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="its training differ") as info:
        _run(tmp_path, digits_split, spec=mlp_spec(), steps=6, learning_rate=5e-4)
    assert str(tmp_path) in str(info.value)
    assert _snapshot(tmp_path) == before


def test_resume_refuses_a_different_dataset(tmp_path: Path, digits_split: DatasetSplit) -> None:
    spec, config = mlp_spec(), tiny_config()
    train(spec, digits_split.train, config, tmp_path, until=3, progress=False)
    other = digits_split.train.select(digits_split.train.ids[:-1])
    with pytest.raises(CheckpointError, match="its dataset differ"):
        train(spec, other, config, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="its model differ"):
        train(unet_spec(), digits_split.train, config, tmp_path, progress=False)
    assert load_checkpoint(tmp_path).step == 3


def test_overwrite_starts_afresh(tmp_path: Path, digits_split: DatasetSplit) -> None:
    spec = mlp_spec()
    _run(tmp_path / "old", digits_split, spec=spec, steps=6)
    other = digits_split.train.select(digits_split.train.ids[:-8])
    fresh = train(spec, other, tiny_config(steps=3), tmp_path / "new", progress=False)
    replaced = train(
        spec, other, tiny_config(steps=3), tmp_path / "old", overwrite=True, progress=False
    )
    assert replaced.step == 3
    assert replaced.metadata["dataset"]["fingerprint"] == other.fingerprint()
    assert replaced.metadata["training"]["steps"] == 3
    # The old run's weights played no part, and its step-6 files are gone.
    assert states_equal(replaced.load_state("model"), fresh.load_state("model"))
    assert not any("00000006" in p.name for p in (tmp_path / "old").iterdir())


def test_finished_run_is_returned_untouched(tmp_path: Path, digits_split: DatasetSplit) -> None:
    first = _run(tmp_path, digits_split, spec=mlp_spec(), steps=3)
    before = _snapshot(tmp_path)
    again = _run(tmp_path, digits_split, spec=mlp_spec(), steps=3)
    assert again.step == first.step == 3
    assert _snapshot(tmp_path) == before
    assert again.metadata == first.metadata


def test_until_beyond_steps_stops_at_steps(tmp_path: Path, digits_split: DatasetSplit) -> None:
    checkpoint = _run(tmp_path, digits_split, spec=mlp_spec(), steps=3, until=10)
    assert checkpoint.step == 3


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (random_dataset(channels=3), "takes 1-channel images, dataset 'noise' has 3"),
        (random_dataset(size=16), "takes 8x8 images, dataset 'noise' has 16x16"),
    ],
    ids=["channels", "size"],
)
def test_data_must_fit_the_model(tmp_path: Path, dataset, message: str) -> None:
    for spec in (unet_spec(), mlp_spec()):
        with pytest.raises(ConfigError, match=message):
            train(spec, dataset, tiny_config(), tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_each_epoch_visits_every_image_once(tmp_path: Path) -> None:
    # With almost no noise (betas of 1e-6) the model sees x_t ~ x0, and image k is the constant
    # -1 + 2k/11, so the mean of each input identifies the training image behind it.
    n = 12
    values = torch.linspace(-1, 1, n)
    dataset = ImageDataset(
        images=values[:, None, None, None].expand(n, 1, 8, 8).clone(),
        ids=np.arange(n) + 100,
        name="levels",
    )
    scheduler_config = {
        "num_train_timesteps": 10,
        "beta_start": 1e-6,
        "beta_end": 1e-6,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
    }
    spec = model_spec("tests.models.custom_model:make_recorder", in_channels=1, sample_size=8)
    custom_model.RECORDED_INPUTS.clear()
    config = tiny_config(steps=6, batch_size=4)
    train(spec, dataset, config, tmp_path, scheduler_config=scheduler_config, progress=False)
    batches = [
        [int(torch.argmin((values - m).abs())) for m in x.mean(dim=(1, 2, 3))]
        for x in custom_model.RECORDED_INPUTS
    ]
    assert len(batches) == 6
    assert all(len(batch) == 4 for batch in batches)
    first = [k for batch in batches[:3] for k in batch]
    second = [k for batch in batches[3:] for k in batch]
    assert sorted(first) == sorted(second) == list(range(n))  # 3 steps per epoch, no repeats
    assert first != second  # reshuffled every epoch


def test_batch_larger_than_dataset_uses_the_whole_dataset(tmp_path: Path) -> None:
    dataset = random_dataset(n=5)
    checkpoint = train(
        mlp_spec(), dataset, tiny_config(steps=2, batch_size=64), tmp_path, progress=False
    )
    assert checkpoint.step == 2
    assert checkpoint.metadata["dataset"]["n"] == 5
    assert checkpoint.metadata["split"] is None


def test_loss_is_finite_and_decreases(tmp_path: Path) -> None:
    # Calling train with until=1, 2, ... records every step's loss and resumes 29 times on the way.
    dataset = load_digits().select(np.arange(256))
    config = TrainConfig(
        steps=30,
        batch_size=64,
        learning_rate=1e-2,
        warmup_steps=2,
        ema_decay=None,
        checkpoint_every=0,
    )
    losses = []
    for until in range(1, 31):
        checkpoint = train(mlp_spec(), dataset, config, tmp_path, until=until, progress=False)
        assert checkpoint.step == until
        losses.append(checkpoint.metadata["last_call"]["final_loss"])
    assert all(math.isfinite(loss) for loss in losses)
    # The output layer starts at zero, so the first loss is the mean squared noise: about 1.
    assert 0.9 < losses[0] < 1.1
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert not load_checkpoint(tmp_path).has_ema


def test_default_warmup_is_five_percent_of_training() -> None:
    config = TrainConfig(steps=1000, learning_rate=1e-3)
    assert config.warmup_steps is None
    assert config.resolved_warmup_steps == 50
    assert config.learning_rate_at(0) == pytest.approx(1e-3 / 50)
    assert config.learning_rate_at(49) == pytest.approx(1e-3)
    assert config.learning_rate_at(50) == pytest.approx(1e-3)
    assert TrainConfig(steps=10).resolved_warmup_steps == 0  # short runs start at the peak


def test_snapshots_keep_every_checkpoint(tmp_path: Path, digits_split: DatasetSplit) -> None:
    spec = unet_spec()
    final = train(
        spec, digits_split.train, tiny_config(), tmp_path / "run", snapshots=True, progress=False
    )
    steps = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert steps == ["step-00000003", "step-00000006"]
    early = load_checkpoint(tmp_path / "run" / "snapshots" / "step-00000003")
    assert early.step == 3
    assert "optimizer" not in early.files
    halfway = train(
        spec, digits_split.train, tiny_config(), tmp_path / "half", until=3, progress=False
    )
    assert states_equal(early.load_state("ema"), halfway.load_state("ema"))
    last = load_checkpoint(tmp_path / "run" / "snapshots" / "step-00000006")
    assert states_equal(last.load_state("model"), final.load_state("model"))
