"""Sampling with DDPM or DDIM, one seed per image, independent of batch size and device."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from diffattr._io import write_json, write_npz
from diffattr.data import save_grid, save_pngs
from diffattr.errors import ConfigError
from diffattr.models._checkpoint import Checkpoint
from diffattr.models._registry import predict

Sampler = Literal["ddpm", "ddim"]

#: Default number of denoising steps per sampler: DDPM uses the full chain, DDIM a short one.
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 100}


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
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Generate one image per seed.

    Image ``i`` depends only on ``seeds[i]``: its starting noise and every noise draw of the
    reverse chain come from its own generator, on the CPU, so the draws are the same whatever the
    batch size, the other seeds, or the device. The images then agree up to float rounding (a
    batched convolution may round differently: about 1e-4 after DDIM on the tiny UNet).

    Args:
        model: Any module called as ``model(x_t, t)`` that predicts the scheduler's target.
        scheduler_config: The diffusers noise-scheduler config the model was trained with.
        seeds: One seed per image.
        shape: (C, H, W) of the images.
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"``.
        num_inference_steps: Denoising steps; default 1000 for DDPM, 100 for DDIM.
        eta: DDIM noise scale (0: deterministic DDIM); ignored by DDPM.
        batch_size: Images per forward pass.
        device: Where to run the model.
        progress: Show a progress bar.

    Returns:
        Images (len(seeds), C, H, W), float32 in [-1, 1], on the CPU.

    Raises:
        ConfigError: Bad sampler, step count, eta, batch size or seeds.
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
    scheduler_cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = scheduler_cls.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    step_kwargs = {"eta": eta} if sampler == "ddim" else {}
    model = model.to(device).eval()
    batches = [list(seeds[i : i + batch_size]) for i in range(0, len(seeds), batch_size)]
    bar = tqdm(
        total=len(batches) * steps, desc=f"sample ({sampler})", unit="step", disable=not progress
    )
    out = []
    for batch in batches:
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in batch]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        for t in scheduler.timesteps:
            prediction = predict(model, x, t.to(device))
            x = scheduler.step(prediction, t, x, generator=generators, **step_kwargs).prev_sample
            bar.update(1)
        out.append(x.clamp(-1, 1).float().cpu())
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
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Load a checkpoint's model (EMA weights by default) and :func:`sample` from it."""
    config = checkpoint.model_spec.config
    try:
        shape = (int(config["in_channels"]), int(config["sample_size"]), int(config["sample_size"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{checkpoint.path}: model config lacks an integer in_channels/sample_size"
        ) from err
    model = checkpoint.load_model(weights, device=str(device))
    return sample(
        model,
        checkpoint.scheduler_config,
        seeds,
        shape=shape,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )


def save_samples(
    images: torch.Tensor,
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save generated images as PNGs, a grid, and ``samples.npz`` with their seeds.

    ``samples.npz`` holds ``images`` (N, C, H, W) float32 in [-1, 1] with ``value_range`` [-1, 1],
    ``seeds`` and ``ids`` (equal to the seeds), so :func:`diffattr.data.load_npz` reads it back
    as a query set.

    Returns:
        The path of ``samples.npz``.
    """
    if len(seeds) != len(images):
        raise ConfigError(f"{len(images)} images but {len(seeds)} seeds")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_array = np.asarray(seeds, dtype=np.int64)
    arrays = {
        "images": images.numpy().astype(np.float32),
        "seeds": seed_array,
        "ids": seed_array,
        "value_range": np.array([-1.0, 1.0], dtype=np.float32),
    }
    npz = out_dir / "samples.npz"
    write_npz(npz, arrays)
    save_pngs(images, out_dir / "png", [f"seed-{int(s):06d}" for s in seeds])
    save_grid(images, out_dir / "grid.png")
    write_json(
        out_dir / "samples.json",
        {"n": len(seeds), "seeds": seed_array.tolist(), **(metadata or {})},
    )
    return npz
