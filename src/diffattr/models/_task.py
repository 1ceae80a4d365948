"""The diffusion task: how a noise schedule noises an image, what the model must predict, the loss.

Training, the gradient features, the LDS ground truth, unlearning, Journey-TRAK and NDA all need
the same three things, and they must agree exactly:

- the noised input ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (diffusers' ``add_noise``,
  so training stays bit-identical to diffusers' own loop);
- the regression target for the scheduler's ``prediction_type``: ``eps`` (epsilon),
  ``sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (v_prediction) or ``x0`` (sample);
- the per-image loss, the mean over pixels of the squared error of the prediction.

The images are the model's ``x0`` (a latent model's scaled latents, see
:func:`~diffattr.models.to_diffusion_space`) and its conditioning comes from
:func:`~diffattr.models.condition`; the task is independent of both.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from diffattr.errors import ConfigError
from diffattr.models._registry import predict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiffusionTask:
    """The noising, targets and loss of one DDPM noise schedule.

    Args:
        scheduler_config: A diffusers DDPM scheduler config (its schedule, ``num_train_timesteps``
            and ``prediction_type``).

    Attributes:
        scheduler: The diffusers scheduler built from the config.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        num_train_timesteps: T; timesteps are integers in [0, T).
        alphas_cumprod: Tensor (T,) float64 of abar_t (the scheduler's float32 values, widened).

    Raises:
        ConfigError: Another prediction type.
    """

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"scheduler prediction_type={self.prediction_type!r} is invalid: must be one of "
                f"{list(PREDICTION_TYPES)}"
            )
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)

    def check_timestep(self, timestep: int) -> int:
        """Return ``timestep`` if it is an integer in [0, T).

        Raises:
            ConfigError: Otherwise.
        """
        if isinstance(timestep, bool) or not isinstance(timestep, int):
            raise ConfigError(f"timestep={timestep!r} is invalid: must be an integer")
        if not 0 <= timestep < self.num_train_timesteps:
            raise ConfigError(
                f"timestep={timestep} is invalid: must be in [0, {self.num_train_timesteps})"
            )
        return timestep

    def scales(self, timestep: int) -> tuple[float, float]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` at one timestep, in float64."""
        abar = self.alphas_cumprod[self.check_timestep(timestep)]
        return float(abar.sqrt()), float((1 - abar).sqrt())

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for each image of ``x0`` (B, ...) at its timestep ``t`` (B,)."""
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the prediction type, shaped like ``x0``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t.to(x0.device))
        return x0

    def losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each image's diffusion loss (B,): the pixel mean of (prediction - target)^2.

        Differentiable in the model's parameters; ``cond`` is the batch's conditioning (None for
        an unconditional model).
        """
        t = t.to(x0.device)
        error = predict(model, self.noised(x0, noise, t), t, cond) - self.target(x0, noise, t)
        return error.square().flatten(1).mean(1)
