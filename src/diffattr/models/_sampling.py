"""Sampling with DDPM or DDIM, one seed per image, independent of batch size and device."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from diffattr._io import write_json, write_npz
from diffattr.data import save_grid, save_pngs
from diffattr.errors import ConfigError, DataError
from diffattr.models._checkpoint import Checkpoint
from diffattr.models._conditional import condition, diffusion_shape, to_image_space
from diffattr.models._registry import predict

Sampler = Literal["ddpm", "ddim"]

#: Default number of denoising steps per sampler: DDPM uses the full chain, DDIM a short one.
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 100}

#: Called by :func:`sample` after each denoising step with ``(rows, t, x_t, x0_pred, x_prev)``:
#: the batch's indices into ``seeds``, the timestep, the state the model was evaluated at, the
#: scheduler's prediction of the clean sample, and the next state (after the last step: the
#: final sample), all in diffusion space (a latent model's latents).
StepHook = Callable[[list[int], int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    seeds: Sequence[int],
    *,
    shape: tuple[int, int, int],
    sampler: Sampler = "ddpm",
    num_inference_steps: int | None = None,
    eta: float = 0.0,
    batch_size: int = 64,
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Generate one image per seed (and per prompt, for a conditional model).

    Image ``i`` depends only on ``seeds[i]``: its starting noise and every noise draw of the
    reverse chain come from its own generator, on the CPU, so the draws are the same whatever the
    batch size, the other seeds, or the device. The images then agree up to float rounding (a
    batched convolution may round differently: about 1e-4 after DDIM on the tiny UNet).

    A conditional model with ``guidance_scale`` w != 1 uses classifier-free guidance: the
    prediction is eps(empty) + w (eps(prompt) - eps(empty)). A latent model samples latents and
    decodes them with its autoencoder.

    Args:
        model: Any module called as ``model(x_t, t)`` (``model(x_t, t, cond)`` when conditional)
            that predicts the scheduler's target.
        scheduler_config: The diffusers noise-scheduler config the model was trained with.
        seeds: One seed per image.
        shape: (C, H, W) of ``x_t``: the images, or a latent model's latents.
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"``.
        num_inference_steps: Denoising steps; default 1000 for DDPM, 100 for DDIM.
        eta: DDIM noise scale (0: deterministic DDIM); ignored by DDPM.
        batch_size: Images per forward pass.
        prompts: One prompt per seed, for a conditional model (required there).
        guidance_scale: Classifier-free guidance weight w (1: the conditional model alone).
        device: Where to run the model.
        progress: Show a progress bar.
        on_step: Sees every state of the chain (see :data:`StepHook`); Journey-TRAK records
            the trajectory with it.

    Returns:
        Images (len(seeds), C, H, W), float32 in [-1, 1], on the CPU.

    Raises:
        ConfigError: Bad sampler, step count, eta, batch size, seeds or guidance scale.
        DataError: Prompts missing for a conditional model, given for an unconditional one, or
            not one per seed.
    """
    if sampler not in DEFAULT_STEPS:
        raise ConfigError(f"sampler={sampler!r} is invalid: choose 'ddpm' or 'ddim'")
    steps = DEFAULT_STEPS[sampler] if num_inference_steps is None else num_inference_steps
    trained_steps = int(scheduler_config["num_train_timesteps"])
    if not 1 <= steps <= trained_steps:
        raise ConfigError(f"num_inference_steps={steps} must be in 1..{trained_steps}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if eta < 0:
        raise ConfigError(f"eta={eta} must be >= 0")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError("seeds must be a non-empty list of distinct integers")
    if prompts is not None and len(prompts) != len(seeds):
        raise DataError(f"{len(prompts)} prompts for {len(seeds)} seeds: give one per image")
    if not guidance_scale >= 0:
        raise ConfigError(f"guidance_scale={guidance_scale} must be >= 0")
    scheduler_cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = scheduler_cls.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    step_kwargs = {"eta": eta} if sampler == "ddim" else {}
    model = model.to(device).eval()
    cond = condition(model, prompts)
    guided = cond is not None and guidance_scale != 1.0
    empty = condition(model, [""]) if guided else None
    rows = list(range(len(seeds)))
    batches = [rows[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    bar = tqdm(
        total=len(batches) * steps, desc=f"sample ({sampler})", unit="step", disable=not progress
    )
    out = []
    for batch in batches:
        generators = [torch.Generator(device="cpu").manual_seed(int(seeds[i])) for i in batch]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        batch_cond = None if cond is None else cond[batch]
        if empty is not None and batch_cond is not None:
            # One forward for both halves of the guidance.
            batch_cond = torch.cat([batch_cond, empty.expand_as(batch_cond)])
        for t in scheduler.timesteps:
            if guided:
                both = predict(model, torch.cat([x, x]), t.to(device), batch_cond)
                conditioned, unconditioned = both.chunk(2)
                prediction = unconditioned + guidance_scale * (conditioned - unconditioned)
            else:
                prediction = predict(model, x, t.to(device), batch_cond)
            step = scheduler.step(prediction, t, x, generator=generators, **step_kwargs)
            if on_step is not None:
                on_step(batch, int(t), x, step.pred_original_sample, step.prev_sample)
            x = step.prev_sample
            bar.update(1)
        out.append(to_image_space(model, x).float().cpu())
    bar.close()
    return torch.cat(out)


def sample_checkpoint(
    checkpoint: Checkpoint,
    seeds: Sequence[int],
    *,
    sampler: Sampler = "ddpm",
    num_inference_steps: int | None = None,
    eta: float = 0.0,
    batch_size: int = 64,
    weights: Literal["auto", "ema", "raw"] = "auto",
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Load a checkpoint's model (EMA weights by default) and :func:`sample` from it."""
    model = checkpoint.load_model(weights, device=str(device))
    shape = diffusion_shape(model)
    if shape is None:
        config = checkpoint.model_spec.config
        try:
            side = int(config["sample_size"])
            shape = (int(config["in_channels"]), side, side)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{checkpoint.path}: model config lacks an integer in_channels/sample_size"
            ) from err
    return sample(
        model,
        checkpoint.scheduler_config,
        seeds,
        shape=shape,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        batch_size=batch_size,
        prompts=prompts,
        guidance_scale=guidance_scale,
        device=device,
        progress=progress,
    )


def save_samples(
    images: torch.Tensor,
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
) -> Path:
    """Save generated images as PNGs, a grid, and ``samples.npz`` with their seeds.

    ``samples.npz`` holds ``images`` (N, C, H, W) float32 in [-1, 1] with ``value_range`` [-1, 1],
    ``seeds``, ``ids`` (equal to the seeds) and, for a conditional model, the ``prompts`` the
    images were generated from, so :func:`diffattr.data.load_npz` reads it back as a query set.

    Returns:
        The path of ``samples.npz``.
    """
    if len(seeds) != len(images):
        raise ConfigError(f"{len(images)} images but {len(seeds)} seeds")
    if prompts is not None and len(prompts) != len(images):
        raise ConfigError(f"{len(images)} images but {len(prompts)} prompts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_array = np.asarray(seeds, dtype=np.int64)
    arrays = {
        "images": images.numpy().astype(np.float32),
        "seeds": seed_array,
        "ids": seed_array,
        "value_range": np.array([-1.0, 1.0], dtype=np.float32),
    }
    if prompts is not None:
        arrays["prompts"] = np.asarray(list(prompts), dtype=np.str_)
    npz = out_dir / "samples.npz"
    write_npz(npz, arrays)
    save_pngs(images, out_dir / "png", [f"seed-{int(s):06d}" for s in seeds])
    save_grid(images, out_dir / "grid.png")
    write_json(
        out_dir / "samples.json",
        {"n": len(seeds), "seeds": seed_array.tolist(), **(metadata or {})},
    )
    return npz
