from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffattr._seed import derive_seed, generator
from diffattr.errors import ConfigError
from diffattr.features._plan import Plan, PlanConfig


def build(**settings: object) -> Plan:
    num_train_timesteps = settings.pop("num_train_timesteps", 1000)
    return Plan.build(PlanConfig(**settings), num_train_timesteps)  # type: ignore[arg-type]


def test_uniform_spaces_timesteps_from_zero() -> None:
    plan = build()
    assert plan.timesteps == (0, 100, 200, 300, 400, 500, 600, 700, 800, 900)
    assert len(plan) == 10
    assert build(num_steps=3, num_train_timesteps=10).timesteps == (0, 3, 6)


def test_cumulative_takes_the_first_timesteps() -> None:
    assert build(strategy="cumulative", num_steps=4).timesteps == (0, 1, 2, 3)


def test_random_draws_distinct_sorted_reproducible_timesteps() -> None:
    plan = build(strategy="random", num_steps=50, seed=3)
    assert len(set(plan.timesteps)) == 50
    assert list(plan.timesteps) == sorted(plan.timesteps)
    assert all(0 <= t < 1000 for t in plan.timesteps)
    assert plan.timesteps == build(strategy="random", num_steps=50, seed=3).timesteps
    assert plan.timesteps != build(strategy="random", num_steps=50, seed=4).timesteps
    expected = torch.randperm(1000, generator=generator(3, "plan-t"))[:50].sort().values
    assert plan.timesteps == tuple(expected.tolist())
    # K = T draws every timestep.
    assert build(strategy="random", num_steps=8, num_train_timesteps=8).timesteps == tuple(range(8))


def test_explicit_keeps_order_and_sets_num_steps() -> None:
    config = PlanConfig(strategy="explicit", timesteps=[500, 20, 999])  # type: ignore[arg-type]
    assert config.timesteps == (500, 20, 999)
    assert config.num_steps == 3
    assert Plan.build(config).timesteps == (500, 20, 999)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_steps": 0}, "PlanConfig.num_steps=0 is invalid: must be >= 1"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"strategy": "linear"}, "PlanConfig.strategy='linear' is invalid"),
        ({"noise": "fixed"}, "PlanConfig.noise='fixed' is invalid"),
        ({"seed": "0"}, "PlanConfig.seed"),
        ({"strategy": "explicit"}, "needs a non-empty list"),
        ({"strategy": "explicit", "timesteps": ()}, "non-empty"),
        ({"strategy": "explicit", "timesteps": (3, 3)}, "distinct"),
        ({"strategy": "explicit", "timesteps": (3, -1)}, ">= 0"),
        ({"strategy": "explicit", "timesteps": (3, True)}, "integers"),
        ({"timesteps": (1, 2)}, "only used with strategy='explicit'"),
    ],
)
def test_invalid_settings_are_config_errors(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PlanConfig(**settings)


def test_build_checks_timesteps_against_the_schedule() -> None:
    with pytest.raises(ConfigError, match=r"\[1000\] outside \[0, 1000\)"):
        build(strategy="explicit", timesteps=(5, 1000))
    with pytest.raises(ConfigError, match="num_steps=20 is invalid: must be <= "):
        build(num_steps=20, num_train_timesteps=10)
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        build(num_train_timesteps=0)


def test_noise_seeds_are_derived_per_step() -> None:
    plan = build(num_steps=3, seed=7)
    assert plan.noise_seeds == tuple(derive_seed(7, "plan-noise", k) for k in range(3))
    assert len(set(plan.noise_seeds)) == 3


def test_shared_noise_is_the_default() -> None:
    assert PlanConfig().noise == "shared"


def test_per_sample_noise_depends_only_on_step_and_id() -> None:
    plan = build(num_steps=3, seed=1, noise="per_sample")
    shape = (1, 4, 4)
    noise = plan.noise_for(1, [5, 9, 2], shape)
    assert noise.shape == (3, 1, 4, 4)
    assert noise.dtype == torch.float32
    assert noise.device.type == "cpu"
    expected = torch.randn(shape, generator=generator(plan.noise_seeds[1], "noise", 9))
    assert torch.equal(noise[1], expected)
    # Another batch, order and id container give the same draw per id.
    again = plan.noise_for(1, torch.tensor([2, 5]), shape)
    assert torch.equal(again[0], noise[2])
    assert torch.equal(again[1], noise[0])
    assert torch.equal(plan.noise_for(1, np.array([9]), shape)[0], noise[1])
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(plan.noise_for(0, [5], shape)[0], noise[0])
    # The plan's seed changes every draw.
    assert not torch.equal(build(num_steps=3, seed=2).noise_for(1, [5], shape)[0], noise[0])


def test_shared_noise_is_one_draw_per_step() -> None:
    plan = build(num_steps=2, noise="shared")
    noise = plan.noise_for(0, [1, 2, 3], (2, 3))
    assert noise.shape == (3, 2, 3)
    assert torch.equal(noise[0], noise[2])
    expected = torch.randn((2, 3), generator=generator(plan.noise_seeds[0], "shared"))
    assert torch.equal(noise[1], expected)
    assert torch.equal(plan.noise_for(0, [42], (2, 3))[0], expected)
    assert not torch.equal(plan.noise_for(1, [1], (2, 3))[0], expected)
    noise[0].zero_()  # rows are independent copies, not views of one draw
    assert torch.equal(noise[1], expected)


def test_noise_for_edge_cases() -> None:
    plan = build(num_steps=2)
    assert plan.noise_for(0, [], (1, 2, 2)).shape == (0, 1, 2, 2)
    with pytest.raises(IndexError, match="plan step 2 is out of range"):
        plan.noise_for(2, [0], (1,))
    with pytest.raises(IndexError):
        plan.noise_for(-1, [0], (1,))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"strategy": "random", "num_steps": 5, "seed": 9, "noise": "shared"},
        {"strategy": "explicit", "timesteps": (7, 3)},
    ],
)
def test_round_trips_through_json(settings: dict) -> None:
    config = PlanConfig(**settings)
    data = json.loads(json.dumps(config.to_dict()))
    assert PlanConfig.from_dict(data) == config
    plan = Plan.build(config, 500)
    restored = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan
    assert restored.num_train_timesteps == 500


def test_from_dict_rejects_unknown_or_inconsistent_data() -> None:
    with pytest.raises(ConfigError, match=r"no fields \['steps'\]"):
        PlanConfig.from_dict({"steps": 3})
    with pytest.raises(ConfigError, match="must be a dict"):
        PlanConfig.from_dict([1])  # type: ignore[arg-type]
    data = build(num_steps=2).to_dict()
    data["timesteps"] = [0, 1]
    with pytest.raises(ConfigError, match="another version"):
        Plan.from_dict(data)
    with pytest.raises(ConfigError, match="'config'"):
        Plan.from_dict({"timesteps": [0]})
