"""The autoencoder of latent diffusion: a small diffusers ``AutoencoderKL``, trained locally.

A latent diffusion model is trained on ``encode_latents(vae, images, scale)`` instead of pixels
and its samples are turned back into images with :func:`decode_latents`. The VAE is trained once,
seeded like the diffusion models (batch order and posterior noise from (``seed``, purpose, step)),
and saved as a regular checkpoint whose metadata carries the ``latent_scale`` to apply.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffattr._config import check_fields, known_fields
from diffattr._seed import derive_seed, generator
from diffattr.data import ImageDataset
from diffattr.errors import CheckpointError, ConfigError
from diffattr.models._checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    refuse_other_run,
    save_checkpoint,
)
from diffattr.models._conditional import decode_latents, downsampling_factor, encode_latents
from diffattr.models._registry import ModelSpec, count_parameters, load_weights, vae_tiny_config


@dataclass(frozen=True, kw_only=True, slots=True)
class VAEConfig:
    """The VAE training recipe, recorded in its checkpoint so that retraining can repeat it.

    The loss is the per-pixel MSE of the reconstruction of a posterior sample plus ``kl_weight``
    times the KL divergence to N(0, I), summed over latent elements and averaged over the batch.
    The KL weight is kept small, as in latent-diffusion autoencoders: it only has to keep the
    latents bounded and smooth for the diffusion model, and a larger one blurs reconstructions.
    """

    steps: int = field(default=3000, metadata={"help": "optimisation steps in total"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate after a linear warm-up (5% of steps)"}
    )
    kl_weight: float = field(
        default=1e-4, metadata={"help": "weight of the KL term relative to the per-pixel MSE"}
    )
    seed: int = field(default=0, metadata={"help": "root seed: initialisation, batches, noise"})

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "kl_weight": self.kl_weight >= 0 and math.isfinite(self.kl_weight),
        }
        allowed = {
            "steps": ">= 1",
            "batch_size": ">= 1",
            "learning_rate": "a finite number > 0",
            "kl_weight": "a finite number >= 0",
        }
        check_fields(self, checks, allowed)

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        """Rebuild a recipe from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**known_fields(cls, data))

    def learning_rate_at(self, step: int) -> float:
        """Learning rate for optimisation step ``step`` (0-based): linear warm-up, then constant."""
        warmup = round(0.05 * self.steps)
        if step < warmup:
            return self.learning_rate * (step + 1) / warmup
        return self.learning_rate


def train_vae(
    dataset: ImageDataset,
    config: VAEConfig,
    out_dir: str | os.PathLike[str],
    *,
    spec: ModelSpec | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> Checkpoint:
    """Train the autoencoder of a latent diffusion model on ``dataset`` and save its checkpoint.

    The checkpoint is written once, at the end (a VAE trains in minutes, so an interrupted run
    starts again rather than resuming). Its metadata records the recipe, the dataset, the
    ``latent_scale`` (see :func:`vae_latent_scale`) and ``reconstruction_rmse``, the RMSE of the
    decoded posterior means on the training images, in the [-1, 1] pixel scale.

    Args:
        dataset: The training images, (N, C, H, W) in [-1, 1]; H and W divisible by the VAE's
            downsampling factor.
        config: The recipe.
        out_dir: Checkpoint directory; a checkpoint there of the same spec, recipe and data is
            returned as it is.
        spec: The ``AutoencoderKL`` config to build (default: ``"vae-tiny"``,
            :func:`vae_tiny_config` for the dataset's channels and height).
        device: Where to train ("cpu", "cuda", "cuda:1"...).
        progress: Show a progress bar.
        overwrite: Train afresh even if ``out_dir`` holds a different run.

    Returns:
        The checkpoint.

    Raises:
        CheckpointError: ``out_dir`` holds a checkpoint of a different run and ``overwrite`` is
            False, or holds a corrupted one.
        ConfigError: The data does not fit the VAE, or training diverged.
    """
    out_dir = Path(out_dir)
    if spec is None:
        spec = ModelSpec(
            name="vae-tiny", config=vae_tiny_config(dataset.channels, dataset.image_size[0])
        )
    metadata = {"vae_training": config.to_dict(), "dataset": dataset.describe()}
    if (out_dir / CHECKPOINT_FILE).exists() and not overwrite:
        # Trusted: it is returned only if its model is `spec`, which the caller chose.
        previous = load_checkpoint(out_dir, trust_remote_code=True)
        _check_same_run(previous, spec, metadata)
        return previous
    model = _seeded_vae(spec, config.seed)
    _check_fits(spec, model, dataset)
    model = model.to(device)
    # foreach: one fused kernel per operation over all tensors, faster for small models.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, foreach=True)

    images = dataset.images.to(device)
    batch_size = min(config.batch_size, len(dataset))
    steps_per_epoch = len(dataset) // batch_size
    model.train()
    bar = tqdm(total=config.steps, desc="train-vae", unit="step", disable=not progress)
    for step in range(config.steps):
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(len(dataset), generator=generator(config.seed, "vae-order", epoch))
        x = images[order[position * batch_size : (position + 1) * batch_size].to(device)]
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=generator(config.seed, "vae-noise", step))
        reconstruction = torch.nn.functional.mse_loss(model.decode(z).sample, x)
        loss = reconstruction + config.kl_weight * posterior.kl().mean()
        if not torch.isfinite(loss):
            raise ConfigError(
                f"VAE training diverged at step {step} (loss {loss.item()}); lower the LR"
            )
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()

    model.eval()
    means = torch.cat([encode_latents(model, chunk, 1.0) for chunk in images.split(batch_size)])
    # One scalar for all latents, like Stable Diffusion's scaling_factor: multiplied by it the
    # latents have unit variance, the scale the diffusion noise schedule is designed for.
    latent_scale = 1.0 / means.std().item()
    decoded = torch.cat([decode_latents(model, chunk, 1.0) for chunk in means.split(batch_size)])
    rmse = (decoded - images).square().mean().sqrt().item()
    return save_checkpoint(
        out_dir,
        model_spec=spec,
        scheduler_config={},
        step=config.steps,
        states={"model": model.state_dict()},
        metadata={
            **metadata,
            "latent_scale": latent_scale,
            "reconstruction_rmse": rmse,
            "n_parameters": count_parameters(model),
        },
    )


def load_vae(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Rebuild a checkpoint's ``AutoencoderKL`` and load its weights, in eval mode.

    Raises:
        CheckpointError: The checkpoint's config does not build an ``AutoencoderKL``, or its
            weights do not fit the model.
    """
    # The initialisation is overwritten by the weights: keep its draws off the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        try:
            vae = AutoencoderKL(**checkpoint.model_spec.config)
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{checkpoint.path}: model config does not build an AutoencoderKL: {err}"
            ) from err
    load_weights(vae, checkpoint.load_state("model"), f"{checkpoint.path}: VAE weights")
    return vae.to(device).eval()


def vae_latent_scale(checkpoint: Checkpoint) -> float:
    """Return the factor that gives a VAE checkpoint's latents unit variance on its training data.

    It is 1 / std of the posterior means of the training images, the ``scale`` argument of
    :func:`encode_latents` and :func:`decode_latents`.

    Raises:
        CheckpointError: The checkpoint was not written by :func:`train_vae`.
    """
    scale = checkpoint.metadata.get("latent_scale")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
        raise CheckpointError(
            f"{checkpoint.path} is not a VAE checkpoint: it records no latent_scale"
        )
    return float(scale)


def _seeded_vae(spec: ModelSpec, seed: int) -> AutoencoderKL:
    # Fork the global RNG so that initialisation is seeded without touching the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        try:
            return AutoencoderKL(**spec.config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot build VAE {spec.name!r} from its config: {err}") from err


def _check_fits(spec: ModelSpec, vae: AutoencoderKL, dataset: ImageDataset) -> None:
    channels = vae.config.in_channels
    # The encoder halves the resolution in every block but the last.
    factor = downsampling_factor(vae.config)
    height, width = dataset.image_size
    if channels != dataset.channels:
        raise ConfigError(
            f"VAE {spec.name!r} takes {channels}-channel images, dataset {dataset.name!r} has "
            f"{dataset.channels}"
        )
    if height % factor or width % factor:
        raise ConfigError(
            f"VAE {spec.name!r} downsamples by {factor}, dataset {dataset.name!r} has "
            f"{height}x{width} images; resize them to a multiple of {factor}"
        )


def _check_same_run(previous: Checkpoint, spec: ModelSpec, metadata: dict[str, Any]) -> None:
    current = {
        "model": spec.to_dict(),
        "vae_training": metadata["vae_training"],
        "dataset": metadata["dataset"]["fingerprint"],
    }
    stored = {
        "model": previous.model_spec.to_dict(),
        "vae_training": previous.metadata.get("vae_training"),
        "dataset": (previous.metadata.get("dataset") or {}).get("fingerprint"),
    }
    refuse_other_run(previous, current, stored)
