"""DDPM training: seeded, resumable, with warm-up + cosine learning rate and optional EMA.

Every random draw of step ``s`` (batch order, timesteps, noise) comes from generators seeded by
(``seed``, purpose, ``s``), so a run resumed from a checkpoint reaches the same weights as an
uninterrupted one, whatever happened in between.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from diffattr._config import check_fields, known_fields
from diffattr._seed import derive_seed, generator
from diffattr.data import DatasetSplit, ImageDataset
from diffattr.errors import ConfigError
from diffattr.models._checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    refuse_other_run,
    save_checkpoint,
)
from diffattr.models._conditional import condition, to_diffusion_space
from diffattr.models._registry import (
    ModelSpec,
    build_model,
    count_parameters,
    load_weights,
    predict,
)
from diffattr.models._task import DiffusionTask
from diffattr.models._vae import vae_latent_scale


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """The training recipe, recorded in every checkpoint so that retraining can repeat it."""

    steps: int = field(default=4000, metadata={"help": "optimisation steps in total"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "linear warm-up steps, then cosine (None: 5% of steps)"}
    )
    ema_decay: float | None = field(
        default=0.999, metadata={"help": "EMA decay of the weights (None: no EMA)"}
    )
    grad_clip: float | None = field(
        default=1.0, metadata={"help": "clip the gradient norm to this (None: no clipping)"}
    )
    seed: int = field(default=0, metadata={"help": "root seed: initialisation, batches, noise"})
    checkpoint_every: int = field(
        default=1000, metadata={"help": "save a resumable checkpoint every this many steps"}
    )
    condition_dropout: float = field(
        default=0.1,
        metadata={
            "help": "conditional models: probability of training an image with the empty "
            "prompt, for classifier-free guidance"
        },
    )

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps is None or 0 <= self.warmup_steps < self.steps,
            "ema_decay": self.ema_decay is None or 0 < self.ema_decay < 1,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "condition_dropout": 0 <= self.condition_dropout < 1,
        }
        allowed = {
            "steps": ">= 1",
            "batch_size": ">= 1",
            "learning_rate": "a finite number > 0",
            "weight_decay": ">= 0",
            "warmup_steps": "None or 0 <= warmup_steps < steps",
            "ema_decay": "None or in (0, 1)",
            "grad_clip": "None or > 0",
            "checkpoint_every": ">= 0 (0: only the final checkpoint)",
            "condition_dropout": "in [0, 1)",
        }
        check_fields(self, checks, allowed)

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a recipe from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**known_fields(cls, data))

    @property
    def resolved_warmup_steps(self) -> int:
        """Warm-up length: ``warmup_steps``, or 5% of ``steps`` when that is None."""
        return round(0.05 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def learning_rate_at(self, step: int) -> float:
        """Learning rate for optimisation step ``step`` (0-based): linear warm-up, cosine decay."""
        warmup = self.resolved_warmup_steps
        if step < warmup:
            return self.learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_scheduler_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The DDPM noise schedule of the papers: linear betas 1e-4..0.02, epsilon prediction."""
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
    )
    return json.loads(scheduler.to_json_string())


def train(
    spec: ModelSpec,
    dataset: ImageDataset,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    split: DatasetSplit | None = None,
    scheduler_config: dict[str, Any] | None = None,
    init: Checkpoint | None = None,
    device: str | torch.device = "cpu",
    until: int | None = None,
    overwrite: bool = False,
    snapshots: bool = False,
    progress: bool = True,
) -> Checkpoint:
    """Train a diffusion model on ``dataset``, resuming from ``out_dir`` if it holds a checkpoint.

    Conditional models (``cunet-tiny``, ``ldm-tiny``) train on the dataset's prompts, each image
    with the empty prompt instead with probability ``config.condition_dropout`` (so that
    sampling can use classifier-free guidance). Latent models train on the scaled latents of
    their autoencoder.

    Args:
        spec: The model to build (see :func:`diffattr.models.model_spec`).
        dataset: The training images, (N, C, H, W) in [-1, 1], with prompts for a conditional
            model.
        config: The recipe.
        out_dir: Checkpoint directory; a checkpoint there from the same spec, recipe, scheduler,
            data and initial weights is resumed (a finished one is returned as it is).
        split: The split ``dataset`` came from, recorded in the checkpoint.
        scheduler_config: diffusers noise-scheduler config (default:
            :func:`default_scheduler_config`).
        init: Where training starts: the pretrained checkpoint that a spec with LoRA adapters
            fine-tunes, or that a spec equal to its own fine-tunes fully (its EMA weights when
            it has them), or the trained ``vae-tiny`` of a latent model. It is recorded (path and
            weights hash) in the checkpoint.
        device: Where to train ("cpu", "cuda", "cuda:1"...).
        until: Stop after this many steps in total (for time-boxed jobs); resume later.
        overwrite: Start afresh even if ``out_dir`` holds a different run.
        snapshots: Also keep every checkpoint as ``out_dir/snapshots/step-<step>/`` (weights
            only), e.g. for TracIn, which sums over checkpoints along training.
        progress: Show a progress bar.

    Returns:
        The last checkpoint written.

    Raises:
        CheckpointError: ``out_dir`` holds a checkpoint of a different run and ``overwrite`` is
            False, or holds a corrupted one.
        ConfigError: The data does not fit the model, or ``init`` does not fit the spec.
        DataError: A conditional model's images have no prompts, or an unconditional model's do.
    """
    out_dir = Path(out_dir)
    scheduler_config = scheduler_config or default_scheduler_config()
    task = DiffusionTask(scheduler_config)
    metadata = {
        "training": config.to_dict(),
        "dataset": dataset.describe(),
        "split": split.to_dict() if split is not None else None,
        "init": None if init is None else {"path": str(init.path), "weights": init.weights_id()},
    }
    _check_fits(spec, dataset)
    model = _seeded_model(spec, config.seed, init).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach: one fused kernel per operation over all tensors (the per-tensor default is ~4x
    # slower for small models, where optimiser overhead rivals the forward and backward).
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
    )
    ema = _Ema(model, config.ema_decay) if config.ema_decay is not None else None
    start = 0
    if (out_dir / CHECKPOINT_FILE).exists() and not overwrite:
        # Trusted because nothing is built from it: it is resumed only if its model is `spec`,
        # which the caller chose, and refused otherwise.
        previous = load_checkpoint(out_dir, trust_remote_code=True)
        _check_same_run(previous, spec, scheduler_config, metadata)
        start = _restore(previous, model, optimizer, ema)
    stop = min(config.steps, until) if until is not None else config.steps
    if start >= stop:
        return load_checkpoint(out_dir, trust_remote_code=True)

    images = _diffusion_inputs(model, dataset, device)
    cond = condition(model, dataset.prompts)
    empty = condition(model, [""]) if cond is not None else None
    batch_size = min(config.batch_size, len(dataset))
    steps_per_epoch = len(dataset) // batch_size
    model.train()
    bar = tqdm(total=stop, initial=start, desc="train", unit="step", disable=not progress)
    began = time.perf_counter()
    for step in range(start, stop):
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(len(dataset), generator=generator(config.seed, "train-order", epoch))
        index = order[position * batch_size : (position + 1) * batch_size].to(device)
        x0 = images[index]
        draw = generator(config.seed, "train-noise", step)
        t = torch.randint(0, task.num_train_timesteps, (batch_size,), generator=draw)
        noise = torch.randn(x0.shape, generator=draw).to(device)
        t = t.to(device)
        # The batch mean of mse_loss, not task.losses' per-image means: bit-identical to diffusers.
        x_t = task.noised(x0, noise, t)
        target = task.target(x0, noise, t)
        batch_cond = None
        if cond is not None and empty is not None:
            dropped = torch.rand(batch_size, generator=generator(config.seed, "train-drop", step))
            keep = (dropped >= config.condition_dropout).to(device)
            batch_cond = torch.where(_expand(keep, cond), cond[index], empty)
        loss = torch.nn.functional.mse_loss(predict(model, x_t, t, batch_cond), target)
        if not torch.isfinite(loss):
            raise ConfigError(
                f"training diverged at step {step} (loss {loss.item()}); lower the LR"
            )
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        done = step + 1
        if done == stop or (config.checkpoint_every and done % config.checkpoint_every == 0):
            elapsed = time.perf_counter() - began
            _save(
                out_dir,
                spec,
                scheduler_config,
                done,
                model,
                optimizer,
                ema,
                metadata,
                {"seconds_this_call": round(elapsed, 3), "final_loss": loss.item()},
                snapshots,
            )
    bar.close()
    return load_checkpoint(out_dir, verify=False, trust_remote_code=True)


def _diffusion_inputs(
    model: torch.nn.Module, dataset: ImageDataset, device: str | torch.device
) -> torch.Tensor:
    # A latent model's images are encoded once: the autoencoder is frozen.
    images = dataset.images.to(device)
    return torch.cat([to_diffusion_space(model, chunk) for chunk in images.split(256)])


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def _check_fits(spec: ModelSpec, dataset: ImageDataset) -> None:
    channels = spec.config.get("in_channels")
    size = spec.config.get("sample_size")
    height, width = dataset.image_size
    if channels is not None and channels != dataset.channels:
        raise ConfigError(
            f"model {spec.name!r} takes {channels}-channel images, dataset "
            f"{dataset.name!r} has {dataset.channels}"
        )
    if size is not None and (size, size) != (height, width):
        raise ConfigError(
            f"model {spec.name!r} takes {size}x{size} images, dataset {dataset.name!r} has "
            f"{height}x{width}; resize the data or build the model for that size"
        )


def _seeded_model(spec: ModelSpec, seed: int, init: Checkpoint | None) -> torch.nn.Module:
    # Fork the global RNG so that initialisation is seeded without touching the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        if spec.lora is not None:
            if init is None:
                raise ConfigError(
                    "a LoRA fine-tune starts from a pretrained model: pass its checkpoint as init"
                )
            _check_base(spec, init)
            model = build_model(spec, base_state=init.load_state(init.weights_role()))
        else:
            model = build_model(spec)
            if init is not None and init.model_spec.to_dict() == spec.to_dict():
                # A full fine-tune: every weight starts from the pretrained model's.
                load_weights(model, init.load_state(init.weights_role()), f"{init.path}: weights")
            elif init is not None:
                _load_autoencoder(model, spec, init)
    if count_parameters(model) == 0:
        raise ConfigError(f"model {spec.name!r} has no trainable parameters")
    return model


def _check_base(spec: ModelSpec, init: Checkpoint) -> None:
    if init.model_spec.to_dict() != spec.without_lora().to_dict():
        raise ConfigError(
            f"{init.path} holds a {init.model_spec.name!r} model of another configuration than "
            f"the one the adapters fine-tune ({spec.name!r}); fine-tune the model it holds"
        )


def _load_autoencoder(model: torch.nn.Module, spec: ModelSpec, init: Checkpoint) -> None:
    vae = getattr(model, "vae", None)
    if vae is None:
        raise ConfigError(
            f"init={init.path} given, but {spec.name!r} has neither LoRA adapters to fine-tune "
            f"nor an autoencoder to load, and the init holds another model "
            f"({init.model_spec.name!r}) than a full fine-tune needs"
        )
    scale = vae_latent_scale(init)
    expected = spec.config.get("vae") or {}
    differing = sorted(
        key
        for key in set(expected) | set(init.model_spec.config)
        if expected.get(key) != init.model_spec.config.get(key)
    )
    if differing:
        raise ConfigError(
            f"{init.path} is an autoencoder of another configuration than {spec.name!r} "
            f"expects (its {', '.join(differing)} differ): train one for these images"
        )
    if not math.isclose(scale, float(spec.config.get("latent_scale", 1.0)), rel_tol=1e-6):
        raise ConfigError(
            f"the model's latent_scale {spec.config.get('latent_scale')} is not the "
            f"autoencoder's ({scale}): build the spec with latent_scale={scale}"
        )
    load_weights(vae, init.load_state("model"), f"{init.path}: autoencoder weights")


class _Ema:
    """Exponential moving average of a model's floating-point state, with the usual warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up keeps early averages from being dominated by the random initialisation.
        decay = min(self.decay, (1 + step) / (10 + step))
        averaged, current = [], []
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                averaged.append(self.state[key])
                current.append(value.detach())
            else:
                self.state[key].copy_(value)
        torch._foreach_lerp_(averaged, current, 1.0 - decay)


def _save(
    out_dir: Path,
    spec: ModelSpec,
    scheduler_config: dict[str, Any],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: _Ema | None,
    metadata: dict[str, Any],
    last_call: dict[str, Any],
    snapshot: bool,
) -> None:
    states = {"model": model.state_dict(), "optimizer": _flatten_optimizer(optimizer)}
    if ema is not None:
        states["ema"] = ema.state
    extra = {**metadata, "last_call": last_call, "n_parameters": count_parameters(model)}
    common = {
        "model_spec": spec,
        "scheduler_config": scheduler_config,
        "step": step,
        "metadata": extra,
    }
    if snapshot:
        weights = {role: state for role, state in states.items() if role != "optimizer"}
        save_checkpoint(out_dir / "snapshots" / f"step-{step:08d}", states=weights, **common)
    # The resumable checkpoint is written last, so every step it records has its snapshot.
    save_checkpoint(out_dir, states=states, **common)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"state.{index}.{key}"] = torch.as_tensor(value)
    return flat


def _restore(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: _Ema | None,
) -> int:
    device = next(model.parameters()).device
    model.load_state_dict(checkpoint.load_state("model"))
    if ema is not None:
        ema.state = {k: v.to(device) for k, v in checkpoint.load_state("ema").items()}
    nested: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in checkpoint.load_state("optimizer").items():
        _, index, name = key.split(".", 2)
        nested.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": nested, "param_groups": optimizer.state_dict()["param_groups"]}
    )
    return checkpoint.step


def _check_same_run(
    previous: Checkpoint,
    spec: ModelSpec,
    scheduler_config: dict[str, Any],
    metadata: dict[str, Any],
) -> None:
    # Recipes compare as settings, so a field added later with its default matches old records.
    stored_recipe = previous.metadata.get("training")
    current = {
        "model": spec.to_dict(),
        "scheduler": _comparable(scheduler_config),
        "training": metadata["training"],
        "dataset": metadata["dataset"]["fingerprint"],
        "initial weights": (metadata["init"] or {}).get("weights"),
    }
    stored = {
        "model": previous.model_spec.to_dict(),
        "scheduler": _comparable(previous.scheduler_config),
        "training": TrainConfig.from_dict(stored_recipe).to_dict() if stored_recipe else None,
        "dataset": (previous.metadata.get("dataset") or {}).get("fingerprint"),
        "initial weights": (previous.metadata.get("init") or {}).get("weights"),
    }
    refuse_other_run(previous, current, stored)


def _comparable(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
