from __future__ import annotations

import pytest
import torch

from diffattr.errors import ConfigError
from diffattr.features import GradientComputer, OutputConfig
from diffattr.models import DiffusionTask, build_model, default_scheduler_config, model_spec


def _config(prediction_type: str) -> dict:
    return {**default_scheduler_config(), "prediction_type": prediction_type}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_noising_and_targets_follow_the_formulas(kind: str) -> None:
    task = DiffusionTask(_config(kind))
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    abar = task.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = task.noised(x0, eps, t)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    expected = {
        "epsilon": eps,
        "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
        "sample": x0,
    }[kind]
    torch.testing.assert_close(task.target(x0, eps, t), expected)
    signal, sigma = task.scales(400)
    assert (signal, sigma) == pytest.approx((float(abar[1].sqrt()), float((1 - abar[1]).sqrt())))


def test_the_gradient_computer_and_the_task_agree_on_the_loss() -> None:
    model = build_model(model_spec("mlp-tiny", in_channels=1, sample_size=8)).double()
    config = _config("v_prediction")
    task = DiffusionTask(config)
    computer = GradientComputer(model, config, OutputConfig(), dtype=torch.float64)
    x0 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    batch = computer.compute(x0, 250, eps)
    with torch.no_grad():
        expected = task.losses(model, x0, eps, torch.full((2,), 250))
    torch.testing.assert_close(batch.losses, expected)


def test_bad_prediction_types_and_timesteps_are_refused() -> None:
    with pytest.raises(ConfigError, match="prediction_type='flow'"):
        DiffusionTask(_config("flow"))
    task = DiffusionTask(default_scheduler_config())
    for bad in (1000, -1, 2.0, True):
        with pytest.raises(ConfigError, match="timestep="):
            task.check_timestep(bad)  # type: ignore[arg-type]
